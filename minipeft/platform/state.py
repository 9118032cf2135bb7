"""One running platform: its settings, state (store.py), job queue (scheduler.py) and model pool
(inference.py), and the names requests use to call a model (a base model or a deployment).

Deleting a fine-tuned model (its record and its folder) is refused while something uses it, with
409 naming it: a deployment (undeploy it first: requests in flight are never cut off by a delete),
a job not yet finished that trains from it, or another fine-tuned model that runs on its weights
(an adapter trained on a full fine-tune). A base model is the server's own: never deleted. Loading
a deployment's model and undeploying it take one lock, so once an undeploy has returned nothing
reads the model's folder any more (nor brings it back into the pool) and a delete may remove it.

A platform owns its data directory: it holds an exclusive lock on DATA_DIR/platform.lock from
before it reads any state until it closes (or its process ends). A second server on the same
directory would otherwise run restart recovery on the first one's live jobs (re-queue the running
one, which would then train twice) before failing, say, on a port already in use."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from ..files import staging_dir
from ..templates import ChatTemplate
from .errors import MODEL_NOT_FOUND, ApiError, not_found, shown
from .files import remove_partial_uploads
from .inference import Loaded, ModelPool, Target
from .jobs import ACTIVE, FineTuneRequest, create_job
from .models import PUBLISHING, remove_partial_models
from .scheduler import Scheduler
from .store import Store

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MIB = 1 << 20
LOCK_FILE = "platform.lock"


def lock_data_dir(data_dir: Path) -> IO[str]:
    """The open lock file of `data_dir`, locked for this process (it holds the owner's pid); a
    directory another server holds is a ValueError naming it, and nothing in it is touched."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as e:  # read-only, not ours, a file in the way
        raise ValueError(f"data directory {data_dir} cannot be written ({e.strerror}): pass a writable "
                         "--data-dir") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise ValueError(f"data directory {data_dir} is in use by another minipeft platform server (pid {owner}, "
                         f"lock {data_dir / LOCK_FILE}): stop that server, or pass another --data-dir") from None
    except OSError as e:  # a filesystem without locks (NFS without lockd: ENOLCK)
        lock.close()
        raise ValueError(f"data directory {data_dir} cannot be locked ({e.strerror}): pass a --data-dir on a "
                         "local filesystem") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


@dataclass
class Settings:
    data_dir: Path
    base_models: dict[str, Path]  # name -> Hugging Face model directory
    api_key: Optional[str] = None  # when set, every request needs "Authorization: Bearer <key>"
    max_upload_bytes: int = 100 * MIB
    max_body_bytes: int = 1 * MIB  # JSON requests
    max_tokens: int = 1024  # the largest max_tokens a completion may ask for
    threads: Optional[int] = None  # CPU threads for inference and for the training worker (None: torch's default)
    device: str = "auto"  # where served models run (TrainConfig.device's names)
    train_device: str = "auto"  # the device of the jobs it creates: on two GPUs, one serves and one trains


class Platform:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.data_dir = settings.data_dir
        self._lock = lock_data_dir(settings.data_dir)  # first: before any state is read
        self.store = Store(settings.data_dir / "platform.db")
        remove_partial_uploads(self.store, settings.data_dir)  # ours alone now: no upload is under way
        remove_partial_models(settings.data_dir)  # nor a publish or a delete
        self.pool = ModelPool(settings.device)
        self.scheduler = Scheduler(self.store, settings.data_dir, settings.threads)
        self._naming = threading.Lock()
        self._loading = threading.Lock()  # resolving a deployment and loading it vs. undeploying it

    def close(self) -> None:
        """Close the state and give up the data directory."""
        self.store.close()
        self._lock.close()

    @property
    def bases(self) -> dict[str, Path]:
        return self.settings.base_models

    def target(self, name: str) -> Target:
        """What a request's `model` calls: a base model or a deployment (404 otherwise)."""
        if name in self.bases:
            return Target(name, self.bases[name])
        deployment = self.store.get("deployments", name)
        model = self.store.get("models", deployment["model"]) if deployment else None
        if model is None:  # no such deployment (or undeployed, its model deleted, since the first read)
            raise not_found("model", name, "GET /v1/models lists the base models and deployments; a fine-tuned "
                            "model is called through a deployment (POST /api/v1/deployments)", code=MODEL_NOT_FOUND)
        return Target(name, Path(model["weights_dir"]), Path(model["adapter_dir"]) if model["adapter_dir"] else None,
                      quantized=model["method"] == "qlora")

    def serve(self, name: str) -> tuple[Loaded, Optional[str], ChatTemplate]:
        """The loaded model, adapter and chat template behind `name`. A model whose files went
        missing or broke on disk is a 503 that names the problem: the request itself was fine."""
        with self._loading:
            target = self.target(name)
            try:
                return self.pool.get(target)
            except Exception as e:  # whatever broke, it is the stored model's fault
                raise ApiError(503, f"model {name!r} cannot be loaded: {type(e).__name__}: {e}") from None

    def create_job(self, req: FineTuneRequest) -> dict[str, Any]:
        """Record fine-tune job `req` (jobs.create_job), under _naming: a delete of its model between
        the check that the model exists and the job's insert would leave a job training from a
        deleted folder; after it, the delete sees the job and refuses."""
        with self._naming:
            return create_job(self.store, self.bases, self.data_dir, req, self.settings.train_device)

    def deploy(self, model: str, name: Optional[str]) -> dict[str, Any]:
        """Make fine-tuned `model` callable as `name` (default: the model's name). Its weights are
        loaded now, so a model that cannot be served is refused here rather than at first call."""
        name = model if name is None else name  # "" is a name given, and refused below
        if not NAME.fullmatch(name):
            raise ApiError(400, f"name {shown(name)}: expected 1-128 letters, digits, '.', '_' or '-', starting with "
                           "a letter or digit", param="name")
        with self._naming:  # check-then-insert, so two requests cannot both take one name (nor a deleted model)
            if self.store.get("models", model) is None:
                raise not_found("fine-tuned model", model, "GET /api/v1/models lists them", code=MODEL_NOT_FOUND,
                                param="model")
            if name in self.bases or self.store.get("deployments", name) is not None:
                raise ApiError(409, f"the name {name!r} is taken; choose another one", param="name")
            row = self.store.insert("deployments", {"name": name, "model": model, "created_at": int(time.time())})
        with self._loading:
            if self.store.get("deployments", name) != row:  # undeployed meanwhile: nothing to load
                raise ApiError(409, f"deployment {name!r} was deleted while it was being created", param="name")
            try:
                self.pool.get(self.target(name))
            except Exception as e:  # whatever broke, the stored model cannot be served
                self.store.delete("deployments", name)
                raise ApiError(400, f"model {model!r} cannot be served: {type(e).__name__}: {e}",
                               param="model") from None
        return row

    def undeploy(self, name: str) -> None:
        with self._loading:  # a load of it under way ends first; none starts after (module docstring)
            if not self.store.delete("deployments", name):
                raise not_found("deployment", name, "GET /api/v1/deployments lists them")
            self.pool.remove(name)

    def delete_model(self, name: str) -> None:
        """Delete fine-tuned model `name`: its record, then its folder (module docstring: when not)."""
        if name in self.bases:
            raise ApiError(400, f"model {name!r} is a base model (one of models/ or a --base-model of the server); only "
                           "fine-tuned models can be deleted")
        # PUBLISHING: no model is published meanwhile on its weights or into its folder; _naming: nor deployed
        with PUBLISHING, self._naming:
            record = self.store.get("models", name)
            if record is None:
                deployment = self.store.get("deployments", name)
                if deployment is not None:
                    raise ApiError(409, f"{name!r} is a deployment of fine-tuned model {deployment['model']!r}: "
                                   f"DELETE /api/v1/deployments/{name} removes it")
                raise not_found("fine-tuned model", name, "GET /api/v1/models lists them", code=MODEL_NOT_FOUND)
            if (use := self._use_of(record)) is not None:
                raise ApiError(409, f"fine-tuned model {name!r} is in use: {use}")
            self.store.delete("models", name)
            folder, trash = self.data_dir / "models" / name, None  # where publish put it
            if folder.exists():  # renamed away under the locks: a publish of the name after them makes a new one
                trash = staging_dir(folder)
                os.replace(folder, trash)
        if trash is not None:  # the slow part, outside the locks
            shutil.rmtree(trash, ignore_errors=True)

    def _use_of(self, record: dict[str, Any]) -> Optional[str]:
        """What keeps the model `record` from being deleted, in words; None if nothing does."""
        name = record["name"]
        if deployments := [d["name"] for d in self.store.rows("deployments", model=name)]:
            return (f"deployed as {', '.join(map(repr, deployments))}: undeploy it first "
                    f"(DELETE /api/v1/deployments/{deployments[0]})")
        if jobs := self.store.rows("jobs", model=name, status=ACTIVE):
            return f"job {jobs[0]['id']} ({jobs[0]['status']}) trains from it: cancel it, or wait until it ends"
        if record["adapter_dir"] is None:  # a full fine-tune: adapters trained on it load its weights
            if riders := [m["name"] for m in self.store.rows("models", weights_dir=record["weights_dir"])
                          if m["name"] != name]:
                return f"fine-tuned model(s) {riders} run on its weights: delete them first"
        return None

"""One running platform: its settings, state (store.py), job queue (scheduler.py) and model pool
(inference.py), and the names requests use to call a model (a base model or a deployment)."""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..templates import ChatTemplate
from .errors import ApiError, not_found
from .inference import Loaded, ModelPool, Target
from .scheduler import Scheduler
from .store import Store

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MIB = 1 << 20


@dataclass
class Settings:
    data_dir: Path
    base_models: dict[str, Path]  # name -> Hugging Face model directory
    api_key: Optional[str] = None  # when set, every request needs "Authorization: Bearer <key>"
    max_upload_bytes: int = 100 * MIB
    max_body_bytes: int = 1 * MIB  # JSON requests
    max_tokens: int = 1024  # the largest max_tokens a completion may ask for
    threads: Optional[int] = None  # CPU threads for inference and for the training worker (None: torch's default)


class Platform:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.data_dir = settings.data_dir
        self.store = Store(settings.data_dir / "platform.db")
        self.pool = ModelPool()
        self.scheduler = Scheduler(self.store, settings.data_dir, settings.threads)
        self._naming = threading.Lock()

    @property
    def bases(self) -> dict[str, Path]:
        return self.settings.base_models

    def target(self, name: str) -> Target:
        """What a request's `model` calls: a base model or a deployment (404 otherwise)."""
        if name in self.bases:
            return Target(name, self.bases[name])
        deployment = self.store.get("deployments", name)
        if deployment is None:
            raise not_found("model", name, "GET /v1/models lists the base models and deployments; a fine-tuned "
                            "model is called through a deployment (POST /api/v1/deployments)")
        model = self.store.get("models", deployment["model"])
        return Target(name, Path(model["weights_dir"]), Path(model["adapter_dir"]) if model["adapter_dir"] else None,
                      quantized=model["method"] == "qlora")

    def serve(self, name: str) -> tuple[Loaded, Optional[str], ChatTemplate]:
        """The loaded model, adapter and chat template behind `name`. A model whose files went
        missing or broke on disk is a 503 that names the problem: the request itself was fine."""
        target = self.target(name)
        try:
            return self.pool.get(target)
        except Exception as e:  # whatever broke, it is the stored model's fault
            raise ApiError(503, f"model {name!r} cannot be loaded: {type(e).__name__}: {e}") from None

    def deploy(self, model: str, name: Optional[str]) -> dict[str, Any]:
        """Make fine-tuned `model` callable as `name` (default: the model's name). Its weights are
        loaded now, so a model that cannot be served is refused here rather than at first call."""
        if self.store.get("models", model) is None:
            raise not_found("fine-tuned model", model, "GET /api/v1/models lists them")
        name = name or model
        if not NAME.fullmatch(name):
            raise ApiError(400, f"name {name!r}: expected 1-128 letters, digits, '.', '_' or '-', starting with "
                           "a letter or digit", param="name")
        with self._naming:  # check-then-insert, so two requests cannot both take one name
            if name in self.bases or self.store.get("deployments", name) is not None:
                raise ApiError(409, f"the name {name!r} is taken; choose another one", param="name")
            row = self.store.insert("deployments", {"name": name, "model": model, "created_at": int(time.time())})
        try:
            self.pool.get(self.target(name))
        except Exception as e:  # whatever broke, the stored model cannot be served
            self.store.delete("deployments", name)
            raise ApiError(400, f"model {model!r} cannot be served: {type(e).__name__}: {e}", param="model") from None
        return row

    def undeploy(self, name: str) -> None:
        if not self.store.delete("deployments", name):
            raise not_found("deployment", name, "GET /api/v1/deployments lists them")
        self.pool.remove(name)

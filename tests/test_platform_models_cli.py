"""`minipeft job models` and `minipeft job deployments` (the server paged both lists; no command
showed them), and deleting a fine-tuned model while something else happens to it: a publish into
its folder or onto its weights, a deployment of it being loaded. The races are made to happen
deterministically: a step of one side starts the other and waits until it has either finished or
blocked on the lock that orders them (Watched), so no test depends on timing."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from minipeft import load_pretrained
from minipeft.cli import main
from minipeft.lora import LoraConfig
from minipeft.peft_model import get_peft_model
from minipeft.files import staging_dir
from minipeft.platform import jobs, models, state
from minipeft.platform.errors import ApiError
from platform_fixtures import base_dir  # noqa: F401
from test_platform_manage import _in_process, _job, _model, app  # noqa: F401 (app: a fixture)


def test_job_models_and_deployments_show_a_page_and_say_when_there_are_more(app, monkeypatch, capsys):
    client, platform = app
    for i in range(3):
        _model(platform, f"m-{i}")
        platform.store.update("models", f"m-{i}", {"created_at": 1000 + i})
        platform.store.insert("deployments", {"name": f"d-{i}", "model": f"m-{i}", "created_at": 1000 + i})
    _in_process(monkeypatch, client)
    assert main(["job", "models", "--page-size", "3"]) == 0
    out, err = capsys.readouterr()
    assert [line.split() for line in out.splitlines()] == [[f"m-{i}", "lora", "tiny", "ft-a"] for i in (2, 1, 0)]
    assert "3 of 4 models, newest first; --page-no 2 for more" in err
    assert main(["job", "models", "--page-size", "3", "--page-no", "2"]) == 0
    out, err = capsys.readouterr()
    assert [line.split() for line in out.splitlines()] == [["tiny", "base", "tiny"]] and err == ""
    assert main(["job", "deployments", "--page-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert [line.split() for line in out.splitlines()] == [["d-2", "m-2"], ["d-1", "m-1"]]
    assert "2 of 3 deployments, newest first; --page-no 2 for more" in err
    assert main(["job", "deployments"]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["d-2", "d-1", "d-0"] and err == ""


@pytest.mark.parametrize("action", ["models", "deployments"])
@pytest.mark.parametrize("flag", ["--page-no", "--page-size"])
def test_job_models_and_deployments_refuse_a_page_below_one_as_list_does(action, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["job", action, flag, "0"])
    assert exited.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


class Watched:
    """A lock that sets `reached` when a caller has to wait for it (another thread holds it)."""

    def __init__(self, reached: threading.Event):
        self._lock, self.reached = threading.Lock(), reached

    def __enter__(self) -> "Watched":
        if not self._lock.acquire(blocking=False):
            self.reached.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def _meanwhile(work: Callable[[], Any], reached: threading.Event) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `work` in a thread until it has ended or waits for a Watched lock; its outcome lands in
    the dict ("error": the ApiError it raised) once the thread is joined."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            work()
        except ApiError as e:
            outcome["error"] = e
        finally:
            reached.set()
    thread = threading.Thread(target=run)
    thread.start()
    reached.wait()
    return thread, outcome


def _job_with_checkpoint(platform, job_id: str, weights: Path, **fields: Any) -> dict[str, Any]:
    """A finished job with checkpoint-3 (a stand-in adapter, its tokenizer.model included)."""
    job = _job(platform.store, platform.data_dir, job_id, "CANCELED", weights=str(weights), **fields)
    adapter = Path(job["config"]["output_dir"]) / "checkpoint-3" / "adapter"
    adapter.mkdir(parents=True)
    for name in ("weights.safetensors", "tokenizer.model"):
        (adapter / name).write_bytes(b"w")
    return job


def test_a_model_published_again_while_its_delete_ends_keeps_its_folder(app, monkeypatch, base_dir):  # noqa: F811
    """The delete removed the folder after it had released its lock: a publish of the same
    checkpoint in between made a new record and folder, and the delete then removed that folder."""
    _, platform = app
    job = _job_with_checkpoint(platform, "ft-a", base_dir)
    name = models.publish(platform.store, platform.data_dir, job, "checkpoint-3")["name"]
    remove, calls = state.shutil.rmtree, []

    def publish_first(path, *args, **kwargs):  # the delete's removal of the folder: a publish comes first
        if not calls:  # once: the publish removes a directory too
            calls.append(path)
            models.publish(platform.store, platform.data_dir, job, "checkpoint-3")
        remove(path, *args, **kwargs)
    monkeypatch.setattr(state.shutil, "rmtree", publish_first)
    platform.delete_model(name)
    assert calls, "the delete removed the folder"
    assert platform.store.get("models", name) is not None
    assert (platform.data_dir / "models" / name / "weights.safetensors").is_file(), "the new model's folder stays"


def test_a_model_deleted_while_an_adapter_on_its_weights_is_published_is_not_deleted(app, monkeypatch):
    """An adapter trained on a full fine-tune runs on its weights. A delete of the full fine-tune
    while a checkpoint of such a job was being published found no model on its weights yet, and
    deleted them: the adapter was published onto weights that no longer existed."""
    _, platform = app
    full = _model(platform, "full-x", full=True)
    (full / "config.json").write_text("{}")
    job = _job_with_checkpoint(platform, "ft-r", full, model="full-x")
    reached = threading.Event()
    lock = Watched(reached)
    monkeypatch.setattr(models, "PUBLISHING", lock, raising=False)
    monkeypatch.setattr(state, "PUBLISHING", lock, raising=False)
    copy, deleting = models._copy_atomic, []

    def delete_meanwhile(*args: Any) -> None:
        copy(*args)
        deleting.append(_meanwhile(lambda: platform.delete_model("full-x"), reached))
    monkeypatch.setattr(models, "_copy_atomic", delete_meanwhile)
    rider = models.publish(platform.store, platform.data_dir, job, "checkpoint-3")
    thread, outcome = deleting[0]
    thread.join()
    assert rider["weights_dir"] == str(full) and platform.store.get("models", rider["name"]) is not None
    assert "error" in outcome, "the full fine-tune was deleted under the adapter published on it"
    assert outcome["error"].status == 409 and f"['{rider['name']}'] run on its weights" in outcome["error"].message
    assert (full / "config.json").is_file() and platform.store.get("models", "full-x") is not None


def test_an_adapter_on_a_deleted_full_fine_tune_is_not_published(app):
    _, platform = app
    full = _model(platform, "full-x", full=True)
    (full / "config.json").write_text("{}")
    job = _job_with_checkpoint(platform, "ft-r", full, model="full-x")
    platform.delete_model("full-x")
    with pytest.raises(ApiError) as refused:
        models.publish(platform.store, platform.data_dir, job, "checkpoint-3")
    assert refused.value.status == 409 and "model 'full-x'" in refused.value.message
    assert "are gone (the model was deleted?)" in refused.value.message
    assert not platform.store.rows("models") and not (platform.data_dir / "models" / "tiny-ft-r-checkpoint-3").exists()


def _lora_model(platform, base_dir: Path, name: str) -> Path:  # noqa: F811
    """A published LoRA model of the base `tiny`: its record and its real adapter folder."""
    folder = platform.data_dir / "models" / name
    get_peft_model(load_pretrained(base_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
                   ).save_pretrained(folder)
    platform.store.insert("models", {"name": name, "job_id": "ft-a", "base_model": "tiny",
                                     "weights_dir": str(base_dir), "adapter_dir": str(folder), "method": "lora",
                                     "checkpoint": None, "created_at": 0})
    return folder


def test_a_model_deleted_while_a_job_from_it_is_created_is_not_deleted(app, monkeypatch, base_dir):  # noqa: F811
    """A job checked that its model exists, then was inserted; a delete in between removed the
    model, and the job then trained from a deleted folder."""
    _, platform = app
    folder = _lora_model(platform, base_dir, "lora-m")
    (platform.data_dir / "files").mkdir(exist_ok=True)
    (platform.data_dir / "files" / "file-1.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    platform.store.insert("files", {"id": "file-1", "filename": "a.jsonl", "purpose": "fine-tune", "bytes": 36,
                                    "lines": 1, "format": "instruction", "created_at": 0})
    reached = threading.Event()
    monkeypatch.setattr(platform, "_naming", Watched(reached), raising=False)
    inherit, deleting = jobs.continuation, []

    def delete_meanwhile(*args: Any) -> dict[str, Any]:  # the model was found: the delete comes now
        deleting.append(_meanwhile(lambda: platform.delete_model("lora-m"), reached))
        return inherit(*args)
    monkeypatch.setattr(jobs, "continuation", delete_meanwhile)
    job = platform.create_job(jobs.FineTuneRequest(model="lora-m", training_file_ids=["file-1"]))
    thread, outcome = deleting[0]
    thread.join()
    assert outcome["error"].status == 409 and f"job {job['id']} (PENDING) trains from it" in outcome["error"].message
    assert platform.store.get("models", "lora-m") is not None and (folder / "adapter_config.json").is_file()


def test_what_a_crash_left_of_a_publish_or_a_delete_is_removed_at_start(tmp_path, base_dir):  # noqa: F811
    models_dir = tmp_path / "data" / "models"
    kept = [models_dir / "tiny-ft-a", models_dir / ".notes"]
    leftovers = [staging_dir(models_dir / "tiny-ft-a"), staging_dir(models_dir / "tiny-ft-b")]
    for folder in kept + leftovers:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.safetensors").write_bytes(b"w")
    state.Platform(state.Settings(tmp_path / "data", {"tiny": Path(base_dir)})).close()
    assert all(f.is_dir() for f in kept) and not any(f.exists() for f in leftovers)


def test_a_deployment_being_loaded_is_undeployed_and_its_model_deleted_only_after_the_load(app, monkeypatch,
                                                                                          base_dir):  # noqa: F811
    """A request resolved its deployment, then an undeploy and a delete of the model ran before the
    pool loaded it (after a restart a deployment loads at its first request): the load read a
    folder being removed (the request failed with 503), or, done first, registered the adapter in
    the pool after the undeploy had removed it, for good."""
    _, platform = app
    folder = _lora_model(platform, base_dir, "lora-m")
    platform.store.insert("deployments", {"name": "bot", "model": "lora-m", "created_at": 0})
    reached = threading.Event()
    monkeypatch.setattr(platform, "_loading", Watched(reached), raising=False)
    resolve, removing = platform.target, []

    def remove_meanwhile(name: str):
        found = resolve(name)
        removing.append(_meanwhile(lambda: (platform.undeploy("bot"), platform.delete_model("lora-m")), reached))
        return found
    monkeypatch.setattr(platform, "target", remove_meanwhile)
    _, adapter, _ = platform.serve("bot")  # the request, accepted before the undeploy, is served
    thread, outcome = removing[0]
    thread.join()
    assert adapter == "bot" and "error" not in outcome
    assert (platform.pool._where, platform.pool._loaded) == ({}, {}), "the undeploy removed it from the pool"
    assert not folder.exists() and platform.store.get("models", "lora-m") is None
    with pytest.raises(ApiError) as gone:
        platform.serve("bot")
    assert gone.value.status == 404

"""The management API's lifecycle endpoints in process (FastAPI's TestClient, no server process,
no scheduler thread, no training): deleting a fine-tuned model, publishing a job's model again
after a failed publish, and paging the lists of jobs and files. Jobs and models are written to
the store as a finished job would leave them, with stand-in files."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

import fastapi  # noqa: F401
from fastapi.testclient import TestClient

from minipeft.cli import main
from minipeft.platform import cli as platform_cli, models
from minipeft.platform.app import create_app
from minipeft.platform.state import Settings
from minipeft.platform.store import Store
from platform_fixtures import base_dir  # noqa: F401

KEY = "k-123"


@pytest.fixture
def app(tmp_path, base_dir):  # noqa: F811
    """(TestClient, Platform) of an application on tmp_path/data; no lifespan, so no scheduler."""
    application = create_app(Settings(tmp_path / "data", {"tiny": Path(base_dir)}, api_key=KEY))
    yield TestClient(application, headers={"Authorization": f"Bearer {KEY}"}), application.state.platform
    application.state.platform.close()


def _job(store: Store, data_dir: Path, job_id: str, status: str, model: str = "tiny", **fields) -> dict:
    output = data_dir / "jobs" / job_id / "output"
    output.mkdir(parents=True, exist_ok=True)
    return store.insert("jobs", {"id": job_id, "model": model, "base_model": "tiny", "training_type": "efficient_sft",
                                 "hyper_parameters": {}, "training_file_ids": [], "validation_file_ids": [],
                                 "config": {"output_dir": str(output), "method": "lora", "test_ratio": 0.1,
                                            "template": "plain", "model": fields.pop("weights", "")},
                                 "status": status, "resumes": 0, "created_at": 0, **fields})


def _model(platform, name: str, full: bool = False, weights: str = "") -> Path:
    """A published model's record and folder (a stand-in file for its weights)."""
    folder = platform.data_dir / "models" / name
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"w")
    platform.store.insert("models", {"name": name, "job_id": "ft-a", "base_model": "tiny",
                                     "weights_dir": str(folder) if full else weights or "/base",
                                     "adapter_dir": None if full else str(folder), "method": "full" if full else "lora",
                                     "checkpoint": None, "created_at": 0})
    return folder


def test_a_fine_tuned_model_is_deleted_with_its_files(app):
    """No endpoint deleted a fine-tuned model: its record and its copy under models/ stayed for good."""
    client, platform = app
    folder = _model(platform, "tiny-ft-a")
    answer = client.delete("/api/v1/models/tiny-ft-a")
    assert (answer.status_code, answer.json()) == (200, {"name": "tiny-ft-a", "deleted": True})
    assert not folder.exists() and client.get("/api/v1/models/tiny-ft-a").status_code == 404
    gone = client.delete("/api/v1/models/tiny-ft-a")
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_not_found")


def test_the_openai_client_deletes_a_fine_tuned_model(app):
    import openai

    client, platform = app
    folder = _model(platform, "tiny-ft-a")
    openai_client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    deleted = openai_client.models.delete("tiny-ft-a")
    assert (deleted.id, deleted.object, deleted.deleted) == ("tiny-ft-a", "model", True)
    assert not folder.exists()
    with pytest.raises(openai.NotFoundError):
        openai_client.models.delete("tiny-ft-a")


@pytest.mark.parametrize("path", ["/api/v1/models/{}", "/v1/models/{}"])
def test_a_model_in_use_is_not_deleted_and_the_answer_says_what_uses_it(app, path):
    client, platform = app
    lora = _model(platform, "lora-m")
    full = _model(platform, "full-m", full=True)
    _model(platform, "lora-on-full", weights=str(full))
    platform.store.insert("deployments", {"name": "bot", "model": "lora-m", "created_at": 0})
    _job(platform.store, platform.data_dir, "ft-b", "RUNNING", model="lora-on-full")
    cases = [("tiny", 400, "'tiny' is a base model"),
             ("lora-m", 409, "deployed as 'bot': undeploy it first (DELETE /api/v1/deployments/bot)"),
             ("bot", 409, "'bot' is a deployment of fine-tuned model 'lora-m'"),
             ("lora-on-full", 409, "job ft-b (RUNNING) trains from it"),
             ("full-m", 409, "fine-tuned model(s) ['lora-on-full'] run on its weights")]
    for name, status, fragment in cases:
        answer = client.delete(path.format(name))
        assert answer.status_code == status and fragment in answer.json()["error"]["message"], (name, answer.text)
    assert lora.exists() and full.exists() and len(platform.store.rows("models")) == 3
    platform.store.delete("deployments", "bot")
    platform.store.update("jobs", "ft-b", {"status": "CANCELED"})
    for name in ("lora-m", "lora-on-full", "full-m"):  # once nothing uses them
        assert client.delete(path.format(name)).status_code == 200, name
    assert not platform.store.rows("models")


def test_a_model_whose_publishing_failed_is_published_again_on_request(app, monkeypatch, base_dir):  # noqa: F811
    """The training succeeded, publishing its model hit a full disk: the job FAILED, and nothing
    could publish its final model afterwards (the publish endpoint takes checkpoints only)."""
    client, platform = app
    job = _job(platform.store, platform.data_dir, "ft-a", "RUNNING", weights=str(base_dir))
    adapter = Path(job["config"]["output_dir"]) / "adapter"
    adapter.mkdir()
    (adapter / "weights.safetensors").write_bytes(b"w")
    (platform.data_dir / "jobs" / "ft-a" / "result.json").write_text(json.dumps({"train": {}, "eval": {}}))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(models.shutil, "copytree", full)
    queue = platform.scheduler
    queue._proc, queue._job_id = subprocess.Popen(["true"]), "ft-a"
    queue._proc.wait()
    queue._tick()
    failed = client.get("/api/v1/fine-tunes/ft-a").json()
    assert failed["status"] == "FAILED" and "No space left on device" in failed["error"], failed
    assert "POST /api/v1/fine-tunes/ft-a/publish" in failed["error"], "the error says how to retry"
    still_full = client.post("/api/v1/fine-tunes/ft-a/publish")
    assert still_full.status_code == 507 and client.get("/api/v1/fine-tunes/ft-a").json()["status"] == "FAILED"
    monkeypatch.undo()
    for _ in range(2):  # and again: the same model, the job as it is
        answer = client.post("/api/v1/fine-tunes/ft-a/publish")
        assert answer.status_code == 200, answer.text
        view = answer.json()
        assert (view["status"], view["fine_tuned_model"], view["error"]) == ("SUCCEEDED", "tiny-ft-a", None), view
    published = client.get("/api/v1/models/tiny-ft-a").json()
    assert published["adapter_dir"] == str(platform.data_dir / "models" / "tiny-ft-a"), published
    assert "succeeded: fine-tuned model tiny-ft-a (published again)" in client.get(
        "/api/v1/fine-tunes/ft-a/logs").json()["logs"][-1]


@pytest.mark.parametrize("status,result", [("FAILED", {"error": "ValueError: cannot split 3 examples"}),
                                           ("FAILED", None), ("RUNNING", None)])
def test_only_a_model_whose_publishing_failed_is_published_again(app, status, result):
    client, platform = app
    _job(platform.store, platform.data_dir, "ft-a", status, error="x" if status == "FAILED" else None)
    if result is not None:
        (platform.data_dir / "jobs" / "ft-a" / "result.json").write_text(json.dumps(result))
    answer = client.post("/api/v1/fine-tunes/ft-a/publish")
    assert answer.status_code == 409 and f"job ft-a is {status}" in answer.json()["error"]["message"], answer.text
    assert platform.store.get("jobs", "ft-a")["status"] == status and not platform.store.rows("models")


def test_lists_of_jobs_and_files_are_paged_newest_first_as_bailian_does(app):
    """The lists were unpaged, oldest first. Bailian's list endpoints, whose API this one follows,
    take page_no (from 1) and page_size (default 10, at most 100), newest first, and say the total."""
    client, platform = app
    ids = [_job(platform.store, platform.data_dir, f"ft-{i:02d}", "SUCCEEDED" if i % 2 else "FAILED",
                created_at=1000 + i)["id"] for i in range(12)]
    newest = ids[::-1]
    first = client.get("/api/v1/fine-tunes").json()
    assert {k: first[k] for k in ("object", "page_no", "page_size", "total")} == \
        {"object": "list", "page_no": 1, "page_size": 10, "total": 12}
    assert [j["id"] for j in first["data"]] == newest[:10]
    assert [j["id"] for j in client.get("/api/v1/fine-tunes?page_no=2").json()["data"]] == newest[10:]
    third = client.get("/api/v1/fine-tunes?page_no=3&page_size=5").json()
    assert ([j["id"] for j in third["data"]], third["total"]) == (newest[10:], 12)
    failed = client.get("/api/v1/fine-tunes?status=FAILED&page_size=2&page_no=2").json()
    assert ([j["id"] for j in failed["data"]], failed["total"]) == (["ft-06", "ft-04"], 6)
    for i in range(3):
        platform.store.insert("files", {"id": f"file-{i}", "filename": "a.jsonl", "purpose": "fine-tune", "bytes": 1,
                                        "lines": 1, "format": "alpaca", "created_at": 1000 + i})
    files = client.get("/api/v1/files?page_size=2").json()
    assert ([f["id"] for f in files["data"]], files["total"]) == (["file-2", "file-1"], 3)
    for query, param in (("page_size=101", "page_size"), ("page_size=0", "page_size"), ("page_no=0", "page_no"),
                         ("page_no=x", "page_no")):
        for path in ("/api/v1/fine-tunes", "/api/v1/files"):
            answer = client.get(f"{path}?{query}")
            assert (answer.status_code, answer.json()["error"]["param"]) == (400, param), (path, answer.text)


def _in_process(monkeypatch, client: TestClient) -> None:
    """The CLI's Client answered by the application in this process; a refusal raises ValueError
    with the server's message, as Client does."""
    class InProcess:
        def __init__(self, server, api_key):
            pass

        def request(self, method, path, body=None, query=None):
            answer = client.request(method, path, json=body,
                                    params={k: v for k, v in (query or {}).items() if v is not None})
            if answer.status_code != 200:
                raise ValueError(f"{method} {path}: HTTP {answer.status_code}: {answer.json()['error']['message']}")
            return answer.json()
    monkeypatch.setattr(platform_cli, "Client", InProcess)


def test_job_list_shows_a_page_and_says_when_there_are_more(app, monkeypatch, capsys):
    client, platform = app
    for i in range(3):
        _job(platform.store, platform.data_dir, f"ft-{i}", "SUCCEEDED", created_at=1000 + i)
    _in_process(monkeypatch, client)
    assert main(["job", "list", "--page-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["ft-2", "ft-1"]
    assert "2 of 3 jobs, newest first; --page-no 2 for more" in err
    assert main(["job", "list", "--page-size", "2", "--page-no", "2"]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["ft-0"] and err == ""


def test_lists_of_models_and_deployments_are_paged_as_jobs_are(app):
    """They were the only unpaged lists: every model and deployment in one answer, oldest first.
    The base models, the server's own (created_at 0), come after the fine-tuned ones."""
    client, platform = app
    names = [f"m-{i:02d}" for i in range(11)]
    for i, name in enumerate(names):
        _model(platform, name)
        platform.store.update("models", name, {"created_at": 1000 + i})
        platform.store.insert("deployments", {"name": f"d-{i:02d}", "model": name, "created_at": 1000 + i})
    first = client.get("/api/v1/models").json()
    assert {k: first[k] for k in ("object", "page_no", "page_size", "total")} == \
        {"object": "list", "page_no": 1, "page_size": 10, "total": 12}
    assert [m["name"] for m in first["data"]] == names[::-1][:10]
    assert [m["name"] for m in client.get("/api/v1/models?page_no=2").json()["data"]] == ["m-00", "tiny"]
    assert [m["name"] for m in client.get("/api/v1/models?page_no=4&page_size=4").json()["data"]] == []
    for size in (1, 3, 5, 12, 13):  # the pages, joined, are the whole list once
        pages = [client.get(f"/api/v1/models?page_no={n}&page_size={size}").json()["data"] for n in range(1, 14)]
        assert [m["name"] for p in pages for m in p] == names[::-1] + ["tiny"], size
    deployments = client.get("/api/v1/deployments?page_size=3&page_no=2").json()
    assert ([d["name"] for d in deployments["data"]], deployments["total"]) == (["d-07", "d-06", "d-05"], 11)
    for path in ("/api/v1/models", "/api/v1/deployments"):
        answer = client.get(f"{path}?page_size=101")
        assert (answer.status_code, answer.json()["error"]["param"]) == (400, "page_size"), answer.text


def test_job_publish_and_delete_model_commands(app, monkeypatch, capsys, base_dir):  # noqa: F811
    """The publish and model-delete endpoints had no command: `minipeft job publish ID` publishes a
    job's final model again after a failed publish (or a --checkpoint), `delete-model` deletes one."""
    client, platform = app
    _in_process(monkeypatch, client)
    job = _job(platform.store, platform.data_dir, "ft-a", "FAILED", weights=str(base_dir), error="disk full")
    output = Path(job["config"]["output_dir"])
    for folder in (output / "adapter", output / "checkpoint-3" / "adapter"):
        folder.mkdir(parents=True)
        (folder / "weights.safetensors").write_bytes(b"w")
    (platform.data_dir / "jobs" / "ft-a" / "result.json").write_text(json.dumps({"train": {}, "eval": {}}))
    assert main(["job", "publish", "ft-a"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["status"], view["fine_tuned_model"]) == ("SUCCEEDED", "tiny-ft-a")
    assert main(["job", "publish", "ft-a", "--checkpoint", "checkpoint-3"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny-ft-a-checkpoint-3"
    assert main(["job", "publish", "ft-a", "--checkpoint", "checkpoint-9"]) == 2
    assert "checkpoint 'checkpoint-9' not found; job ft-a has ['checkpoint-3']" in capsys.readouterr().err
    assert main(["job", "delete-model", "tiny-ft-a-checkpoint-3"]) == 0
    assert capsys.readouterr().out == "deleted tiny-ft-a-checkpoint-3\n"
    assert not (platform.data_dir / "models" / "tiny-ft-a-checkpoint-3").exists()
    platform.store.insert("deployments", {"name": "bot", "model": "tiny-ft-a", "created_at": 0})
    assert main(["job", "delete-model", "tiny-ft-a"]) == 2
    assert "HTTP 409: fine-tuned model 'tiny-ft-a' is in use: deployed as 'bot'" in capsys.readouterr().err
    assert [m["name"] for m in platform.store.rows("models")] == ["tiny-ft-a"]

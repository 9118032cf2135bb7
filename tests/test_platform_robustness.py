"""The platform under conditions a demanding user meets: a worker that cannot start or is killed, a
log read while the worker writes it, a power loss after an upload, a full disk while publishing,
API keys no client can send, a job that brings the server down at every start, uploads a crash cut
short, a database of an older version, and the usual curl mistakes. Unit-level: the scheduler, the
store and the application (FastAPI's TestClient, no server process, no scheduler thread), so each
runs in well under a second, no training involved."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

import fastapi  # noqa: F401
from fastapi.testclient import TestClient

from minipeft.cli import main  # noqa: E402
from minipeft.platform import files, jobs, models, scheduler  # noqa: E402
from minipeft.platform.app import create_app  # noqa: E402
from minipeft.platform.state import Settings  # noqa: E402
from minipeft.platform.store import TABLES, Store  # noqa: E402
from platform_fixtures import base_dir  # noqa: E402,F401

GOOD = b'{"instruction": "Say hi.", "output": "hi"}\n' * 12
KEY = "k-123"


def _job(store: Store, data_dir: Path, job_id: str, status: str) -> dict:
    output = data_dir / "jobs" / job_id / "output"
    output.mkdir(parents=True)
    return store.insert("jobs", {"id": job_id, "model": "tiny", "base_model": "tiny",
                                 "training_type": "efficient_sft", "hyper_parameters": {}, "training_file_ids": [],
                                 "validation_file_ids": [], "config": {"output_dir": str(output), "method": "lora",
                                                                       "test_ratio": 0.1, "template": "plain"},
                                 "status": status, "resumes": 0, "created_at": 0})


def _log(data_dir: Path, job_id: str) -> str:
    return (data_dir / "jobs" / job_id / "logs.txt").read_text()


@pytest.fixture
def app(tmp_path, base_dir):
    """(TestClient, Platform) of an application on tmp_path/data; no lifespan, so no scheduler."""
    application = create_app(Settings(tmp_path / "data", {"tiny": Path(base_dir)}, api_key=KEY))
    yield TestClient(application, headers={"Authorization": f"Bearer {KEY}"}), application.state.platform
    application.state.platform.close()


def test_a_worker_that_cannot_start_fails_its_job_and_the_next_one_runs(tmp_path, monkeypatch):
    """Popen failing (no process slots, no file descriptors) left the job RUNNING with no worker
    for good: it could be neither canceled (CANCELING forever) nor deleted."""
    store = Store(tmp_path / "platform.db")
    _job(store, tmp_path, "ft-a", "QUEUING")
    _job(store, tmp_path, "ft-b", "QUEUING")
    started, real_popen = [], subprocess.Popen

    def popen(args, **kwargs):
        started.append(args)
        if len(started) == 1:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_popen(["true"])
    monkeypatch.setattr(scheduler.subprocess, "Popen", popen)
    queue = scheduler.Scheduler(store, tmp_path)
    queue._tick()
    failed = store.get("jobs", "ft-a")
    assert failed["status"] == "FAILED" and failed["finished_at"], failed
    assert "the training worker could not be started" in failed["error"]
    assert "temporarily unavailable" in failed["error"]
    assert "failed: the training worker could not be started" in _log(tmp_path, "ft-a")
    queue._tick()
    assert store.get("jobs", "ft-b")["status"] == "RUNNING" and len(started) == 2
    queue._end_worker()
    store.close()


def test_a_worker_killed_by_a_signal_says_which(tmp_path):
    """The out-of-memory killer's SIGKILL read "exited with status -9"."""
    store = Store(tmp_path / "platform.db")
    _job(store, tmp_path, "ft-a", "RUNNING")
    queue = scheduler.Scheduler(store, tmp_path)
    queue._proc, queue._job_id = subprocess.Popen(["sleep", "60"]), "ft-a"
    queue._proc.send_signal(signal.SIGKILL)
    queue._proc.wait()
    queue._tick()
    job = store.get("jobs", "ft-a")
    assert job["status"] == "FAILED"
    assert job["error"].startswith("the training worker was killed by SIGKILL"), job["error"]
    assert "out of memory" in job["error"] and job["error"] in _log(tmp_path, "ft-a")
    store.close()


def test_logs_of_a_running_job_hold_only_the_lines_it_has_ended(tmp_path):
    """The worker writes a line's text and its newline in separate writes (print, unbuffered): a
    reader got the half line, counted it, and asked for the next page from past it, so the rest of
    that line was never shown. A finished job's last line counts even without its newline."""
    job = {"id": "ft-a", "status": "RUNNING"}
    log = tmp_path / "jobs" / "ft-a" / "logs.txt"
    log.parent.mkdir(parents=True)
    log.write_bytes("step=1 loss=2.5\nstep=2 lo".encode())
    page = jobs.read_logs(tmp_path, job, 0, 100)
    assert (page["total"], page["logs"]) == (1, ["step=1 loss=2.5"])
    with open(log, "ab") as f:
        f.write("ss=2.1 é\nstep=3 loss=1.9\n".encode()[:-1])  # ... up to but not including the last newline
    page = jobs.read_logs(tmp_path, job, page["total"], 100)
    assert (page["total"], page["logs"]) == (2, ["step=2 loss=2.1 é"])
    assert jobs.read_logs(tmp_path, {**job, "status": "FAILED"}, 2, 100)["logs"] == ["step=3 loss=1.9"]


def test_an_upload_is_fsynced_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    """As every other file the project writes (minipeft.files.write_atomic): without it a power loss
    could keep the record and the rename but not the data, an empty or torn training file."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", os.stat(a).st_ino)) or real_replace(a, b))
    store = Store(tmp_path / "platform.db")
    record = files.save_upload(store, tmp_path, "a.jsonl", io.BytesIO(GOOD), 1 << 20)
    stored = tmp_path / "files" / f"{record['id']}.jsonl"
    assert stored.read_bytes() == GOOD
    file, folder = stored.stat().st_ino, stored.parent.stat().st_ino
    assert [c for c in calls if c[1] in (file, folder)] == [("fsync", file), ("replace", file), ("fsync", folder)]
    store.close()


@pytest.mark.parametrize("key,why", [("", "is empty"), ("pässwort", "printable ASCII"),
                                     (" key", "printable ASCII"), ("a\tb", "printable ASCII")])
def test_an_api_key_no_client_can_send_is_refused_at_start(tmp_path, monkeypatch, capsys, key, why):
    """The guard compares the header as sent; HTTP clients send headers in ASCII (httpx, so the
    openai client, refuses others) and servers strip the value's outer spaces: such a key was
    accepted, and then every request was 401. An empty one (MINIPEFT_API_KEY="") required an empty
    bearer token, which clients treat as no key at all."""
    import uvicorn
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("it started serving"))
    assert main(["platform", "--data-dir", str(tmp_path / "data"), "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert "minipeft platform: error: --api-key" in err and why in err, err
    assert not (tmp_path / "data").exists(), "refused before anything was started"


def test_a_split_out_of_range_is_named_as_sent(app):
    """The API's `split` is TrainConfig's test_ratio: the error named a field the request lacks."""
    client, _ = app
    uploaded = client.post("/api/v1/files", files={"file": ("a.jsonl", GOOD)}).json()
    answer = client.post("/api/v1/fine-tunes", json={"model": "tiny", "training_file_ids": [uploaded["id"]],
                                                     "hyper_parameters": {"split": 1.5}})
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "split=1.5 (expected in (0, 1))" in message and "test_ratio" not in message, message


def test_validation_data_trained_on_or_beside_a_split_is_refused_naming_both(app):
    """A file given as training and validation data gave validation metrics of data trained on, and
    a split beside validation files was ignored: both silently."""
    client, platform = app
    a, b = (client.post("/api/v1/files", files={"file": ("a.jsonl", GOOD)}).json()["id"] for _ in range(2))
    cases = [({"training_file_ids": [a, b], "validation_file_ids": [b]}, "validation_file_ids",
              f"file(s) ['{b}'] are in both training_file_ids and validation_file_ids"),
             ({"training_file_ids": [a], "validation_file_ids": [b], "hyper_parameters": {"split": 0.2}},
              "hyper_parameters.split", "hyper_parameters.split is the share of training data held out when no "
              "validation_file_ids are given; this request gives both")]
    for body, param, fragment in cases:
        answer = client.post("/api/v1/fine-tunes", json={"model": "tiny", **body})
        error = answer.json()["error"]
        assert (answer.status_code, error["param"]) == (400, param) and fragment in error["message"], answer.text
    assert not platform.store.rows("jobs")
    held_out = client.post("/api/v1/fine-tunes", json={"model": "tiny", "training_file_ids": [a],
                                                       "validation_file_ids": [b]})
    assert held_out.status_code == 200, held_out.text
    # the job's view said split 0.1 (the unused default) beside its validation file
    assert held_out.json()["effective_hyper_parameters"]["split"] is None
    split = client.post("/api/v1/fine-tunes", json={"model": "tiny", "training_file_ids": [a],
                                                    "hyper_parameters": {"split": 0.2}}).json()
    assert split["effective_hyper_parameters"]["split"] == 0.2


def test_a_401_under_v1_is_openais_and_the_management_apis_stays_its_own(app):
    """A wrong key answered type "authentication_error" on /v1 too, where OpenAI answers
    "invalid_request_error" with code "invalid_api_key" (clients test the code)."""
    import openai

    client, _ = app
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert (refused.value.code, refused.value.type, refused.value.param) == ("invalid_api_key",
                                                                           "invalid_request_error", None)
    bare = TestClient(client.app)  # no Authorization header at all
    for path, kind, code in (("/v1/models", "invalid_request_error", None),
                             ("/api/v1/files", "authentication_error", None)):
        answer = bare.get(path)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == (kind, code) and "no API key" in error["message"], error
    error = bare.get("/api/v1/files", headers={"Authorization": "Bearer nope"}).json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", None) and "wrong API key" in error["message"]
    assert "nope" not in error["message"], "the key sent is not echoed"


def test_a_full_disk_while_publishing_is_507_and_leaves_nothing(tmp_path, monkeypatch, base_dir):
    """A disk error was a 409 Conflict hinting that save_total_limit rotated the checkpoint out:
    the client was told its request conflicted, and to list the checkpoints again."""
    store = Store(tmp_path / "platform.db")
    job = _job(store, tmp_path, "ft-a", "SUCCEEDED")
    job["config"]["model"] = str(base_dir)
    (Path(job["config"]["output_dir"]) / "checkpoint-3" / "adapter").mkdir(parents=True)
    (Path(job["config"]["output_dir"]) / "checkpoint-3" / "adapter" / "w.bin").write_bytes(b"w")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(models.shutil, "copytree", full)
    with pytest.raises(models.ApiError) as refused:
        models.publish(store, tmp_path, job, "checkpoint-3")
    assert refused.value.status == 507, refused.value.message
    assert "No space left on device" in refused.value.message and "rotated" not in refused.value.message
    assert store.rows("models") == [] and not list((tmp_path / "models").iterdir())
    monkeypatch.undo()
    checkpoint = Path(job["config"]["output_dir"]) / "checkpoint-3"
    monkeypatch.setattr(models, "list_checkpoints", lambda output: [checkpoint])  # listed, then rotated out:
    checkpoint.rename(checkpoint.with_name("gone"))  # still a 409
    with pytest.raises(models.ApiError) as rotated:
        models.publish(store, tmp_path, job, "checkpoint-3")
    assert rotated.value.status == 409 and "rotated" in rotated.value.message
    store.close()


def test_json_sent_as_a_form_says_to_send_json(app):
    """curl -d '{...}' without -H 'Content-Type: application/json' sends a form: the answer was
    "Input should be a valid dictionary or object" about the very JSON object the user sent."""
    client, _ = app
    body = json.dumps({"model": "tiny", "training_file_ids": ["file-x"]})
    for path in ("/api/v1/fine-tunes", "/api/v1/deployments", "/v1/chat/completions"):
        answer = client.post(path, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert "Content-Type: application/json" in message and "application/x-www-form-urlencoded" in message, message


def test_a_worker_that_ended_just_before_the_server_stopped_keeps_its_outcome(tmp_path, monkeypatch):
    """The worker exited with its result, and the server stopped before the next tick read it: the
    job was re-queued as if interrupted, its result lost, and trained again at the next start (from
    scratch with save_strategy "no")."""
    store = Store(tmp_path / "platform.db")
    _job(store, tmp_path, "ft-a", "RUNNING")
    (tmp_path / "jobs" / "ft-a" / "result.json").write_text(json.dumps({"train": {}, "eval": {}}))
    monkeypatch.setattr(scheduler, "publish", lambda *args: {"name": "tiny-ft-a"})
    queue = scheduler.Scheduler(store, tmp_path)
    queue._proc, queue._job_id = subprocess.Popen(["true"]), "ft-a"
    queue._proc.wait()
    queue.stop()
    job = store.get("jobs", "ft-a")
    assert (job["status"], job["fine_tuned_model"], job["resumes"]) == ("SUCCEEDED", "tiny-ft-a", 0), job
    assert "re-queued" not in _log(tmp_path, "ft-a")
    store.close()


@pytest.mark.parametrize("header", [f"Bearer  {KEY}", f"Bearer\t{KEY}", f"bEaReR \t {KEY}", f" Bearer {KEY} "])
def test_the_api_key_may_follow_the_scheme_after_any_spaces(app, header):
    """RFC 6750 puts one or more spaces between "Bearer" and the token (RFC 9110: the scheme is
    case-insensitive, outer whitespace is not part of the value), and servers split on any run of
    spaces and tabs: "Bearer  KEY", with two spaces, was refused."""
    client, _ = app
    assert client.get("/v1/models", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header", [f"Bearer{KEY}", f"Bearer {KEY} {KEY}", f"Basic {KEY}", f"Bearer {KEY}\x0b"])
def test_the_api_key_is_still_one_token_after_the_scheme(app, header):
    client, _ = app
    answer = client.get("/v1/models", headers={"Authorization": header})
    assert answer.status_code == 401 and "API key" in answer.json()["error"]["message"], answer.text


def test_a_job_the_server_went_down_under_three_times_is_failed_not_requeued(tmp_path):
    """A job whose training brings the server down (the OOM killer taking the server, say) was
    re-queued at every restart, and brought it down again, without end. Each such interruption is
    counted in the job's state; the third fails it. A clean stop is no interruption."""
    store = Store(tmp_path / "platform.db")
    _job(store, tmp_path, "ft-a", "RUNNING")
    queue = scheduler.Scheduler(store, tmp_path)
    queue._proc, queue._job_id = subprocess.Popen(["sleep", "60"]), "ft-a"
    queue.stop()  # a clean stop re-queues it, and counts nothing
    assert (store.get("jobs", "ft-a")["status"], store.get("jobs", "ft-a")["interruptions"]) == ("QUEUING", 0)
    for restart in (1, 2, 3):
        store.update("jobs", "ft-a", {"status": "RUNNING"})  # launched, then the server died under it
        scheduler.Scheduler(store, tmp_path)._recover()
        job = store.get("jobs", "ft-a")
        assert job["interruptions"] == restart, job
        if restart < 3:
            assert job["status"] == "QUEUING", job
    assert job["status"] == "FAILED" and job["finished_at"], job
    assert "interrupted 3 times" in job["error"] and "out of memory" in job["error"], job["error"]
    assert f"failed: {job['error']}" in _log(tmp_path, "ft-a")
    store.close()


def test_a_database_of_an_older_platform_gets_the_new_columns(tmp_path):
    """A column added to TABLES made an existing platform.db fail every query (no such column)."""
    old = [c for c in TABLES["jobs"] if c != "interruptions"]
    db = sqlite3.connect(tmp_path / "platform.db")
    db.execute(f"CREATE TABLE jobs ({old[0]} TEXT PRIMARY KEY, {', '.join(old[1:])})")
    db.execute("INSERT INTO jobs (id, status, created_at) VALUES ('ft-old', 'SUCCEEDED', 0)")
    db.commit()
    db.close()
    store = Store(tmp_path / "platform.db")
    assert store.get("jobs", "ft-old")["interruptions"] == 0
    store.close()


def test_uploads_a_crash_cut_short_are_removed_at_start(tmp_path, base_dir):
    """save_upload writes to files/.<id>.upload, renames it to <id>.jsonl when checked, then records
    it; a server killed before the record left the file there for good (up to the upload limit each,
    an id no client was told): the temp file before the rename, the stored file after it."""
    folder = tmp_path / "data" / "files"
    folder.mkdir(parents=True)
    partial = folder / ".file-20250101120000-0a1b2c3d.upload"
    orphan = folder / "file-20250101120000-0a1b2c3d.jsonl"
    recorded = folder / "file-20250101120000-99999999.jsonl"
    others = [recorded, folder / ".notes.upload", folder / "mine.upload", folder / "mine.jsonl"]
    for path in [partial, orphan, *others]:
        path.write_bytes(GOOD)
    store = Store(tmp_path / "data" / "platform.db")
    store.insert("files", {"id": recorded.stem, "filename": "a.jsonl", "purpose": "fine-tune", "bytes": len(GOOD),
                           "lines": 1, "format": "alpaca", "created_at": 0})
    store.close()
    application = create_app(Settings(tmp_path / "data", {"tiny": Path(base_dir)}))
    application.state.platform.close()
    assert not partial.exists() and not orphan.exists(), "the uploads a crash cut short are gone"
    assert all(p.exists() for p in others), "a recorded upload, and files not ours, stay"

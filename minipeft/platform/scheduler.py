"""The job queue: one thread in the server that trains one job at a time, each in its own process.

Every POLL seconds: PENDING jobs get their data copied into their directory and become QUEUING;
when no worker runs, the oldest QUEUING job becomes RUNNING and `python -m
minipeft.platform.worker JOB_DIR` starts, its stdout and stderr appended to the job's logs.txt.
A separate process keeps the API responsive (training holds the GIL and the cores) and lets a
cancel end the work at once (SIGTERM; checkpoints are written atomically, so none is torn).

Restarts: the job table is the queue, so PENDING and QUEUING jobs simply wait again; a job that
was RUNNING is re-queued and its worker resumes from the newest checkpoint (run_job with
resume=True, the trainer's exact resume); a CANCELING one is CANCELED. A job the server went down
under (not a clean stop) counts it in its `interruptions`; the MAX_INTERRUPTIONS-th fails it, as
the job may be what brings the server down (its training taking the memory, so the OOM killer
takes the server): re-queued at every restart, it would bring each one down again.

The scheduler alone moves jobs from QUEUING on; request threads only cancel, and publish a model
again (below), with conditional updates (store.update).

Cancel vs. the end of training: a cancel the scheduler sees while the worker runs cancels the job.
Once the worker has exited, its outcome stands: a cancel that lands then (before the scheduler
reads the result, or while it publishes the model) is too late, and the job still ends SUCCEEDED,
or FAILED with the worker's error, its log saying the cancel was not applied. Every job ends in a
final state.

Publishing the model of a job whose training succeeded can fail (a full disk: 507); the job is
then FAILED, its trained output kept. POST /api/v1/fine-tunes/{id}/publish (publish_again) tries
again, and the job becomes SUCCEEDED with its model, as it would have been.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from ..train_state import latest_checkpoint
from .errors import ApiError
from .jobs import job_dir, prepare_job
from .models import publish
from .store import Store

POLL = 0.2
TERMINATE_GRACE = 5.0
ENDING = ("RUNNING", "CANCELING")  # what a job whose worker exited may be in: a cancel can land meanwhile
MAX_INTERRUPTIONS = 3


def note(data_dir: Path, job: dict[str, Any], text: str) -> None:
    """Append a platform line to the job's log, where the worker's own output goes too."""
    path = job_dir(data_dir, job) / "logs.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"[platform {time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")


def _exit_reason(returncode: int) -> str:
    """Why a worker ended without a result, in words: Popen reports death by signal N as -N."""
    if returncode >= 0:
        return f"the training worker exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
    return f"the training worker was killed by {name}{hint}"


def read_result(data_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The worker's result.json; {} when there is none (the worker was killed before its end)."""
    try:
        return json.loads((job_dir(data_dir, job) / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def publish_again(store: Store, data_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Publish the final model of a job whose training succeeded and whose publishing failed, and
    make the job SUCCEEDED; a SUCCEEDED job is answered as it is. Returns the job as it is now."""
    if job["status"] == "SUCCEEDED":
        return job
    result = read_result(data_dir, job)
    if job["status"] != "FAILED" or not result or "error" in result:
        raise ApiError(409, f"job {job['id']} is {job['status']}: only a job whose training succeeded and whose "
                       "publishing failed has a model to publish again")
    model = publish(store, data_dir, job)  # 507 again while the disk is full
    if store.update("jobs", job["id"], {"status": "SUCCEEDED", "fine_tuned_model": model["name"], "error": None},
                    when_status=("FAILED",)):
        note(data_dir, job, f"succeeded: fine-tuned model {model['name']} (published again)")
    return store.get("jobs", job["id"])


class Scheduler:
    def __init__(self, store: Store, data_dir: Path, threads: Optional[int] = None):
        self.store, self.data_dir, self.threads = store, data_dir, threads
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._proc: Optional[subprocess.Popen] = None
        self._job_id: Optional[str] = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="minipeft-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the queue; a running job goes back to QUEUING, to resume at the next start. A worker
        that has already exited, unseen by the last tick, is finished instead: its outcome stands."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._proc is not None and self._proc.poll() is not None:
            self._reap()
        elif self._proc is not None:
            job = self.store.get("jobs", self._job_id)
            self._end_worker()
            self._requeue(job, "the server stopped")

    def _recover(self) -> None:
        for job in self.store.rows("jobs", status="RUNNING"):  # the server went down under it
            interruptions = job["interruptions"] + 1
            if interruptions < MAX_INTERRUPTIONS:
                self._requeue(job, "the server stopped while this job ran", interruptions=interruptions)
                continue
            error = (f"interrupted {MAX_INTERRUPTIONS} times: the server went down {MAX_INTERRUPTIONS} times while "
                     "this job ran, and the job may be what brings it down (out of memory? lower batch_size or "
                     "max_length), so it is not re-queued again; its checkpoints can still be published")
            self._end(job, {"status": "FAILED", "error": error, "interruptions": interruptions}, f"failed: {error}",
                      ("RUNNING",))
        for job in self.store.rows("jobs", status="CANCELING"):
            self.store.update("jobs", job["id"], {"status": "CANCELED", "finished_at": int(time.time())})

    def _requeue(self, job: dict[str, Any], why: str, **fields: Any) -> None:
        """Back to QUEUING (with `fields` set too), to resume from its newest checkpoint."""
        last = latest_checkpoint(Path(job["config"]["output_dir"]))
        where = f"from {last.name}" if last else "from the start (no checkpoint yet)"
        if self.store.update("jobs", job["id"], {"status": "QUEUING", "resumes": job["resumes"] + 1, **fields},
                             when_status=("RUNNING",)):
            note(self.data_dir, job, f"{why}; re-queued, it will resume {where}")

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self._tick()
            except Exception:  # a bug here must not stop the queue: log it and go on
                traceback.print_exc()

    def _tick(self) -> None:
        for job in self.store.rows("jobs", status="PENDING"):
            self._prepare(job)
        if self._proc is None:
            queued = self.store.rows("jobs", status="QUEUING")
            if queued:
                self._launch(queued[0])
            return
        if self._proc.poll() is not None:  # ended: its outcome stands, a cancel landed meanwhile or not
            self._reap()
            return
        job = self.store.get("jobs", self._job_id)
        if job["status"] == "CANCELING":
            self._end_worker()
            self.store.update("jobs", job["id"], {"status": "CANCELED", "finished_at": int(time.time())})
            note(self.data_dir, job, "canceled")

    def _prepare(self, job: dict[str, Any]) -> None:
        try:
            prepare_job(self.store, self.data_dir, job)
        except (ValueError, OSError) as e:
            self._fail(job, f"preparing the job's data failed: {e}", ("PENDING",))
            return
        if self.store.update("jobs", job["id"], {"status": "QUEUING"}, when_status=("PENDING",)):
            note(self.data_dir, job, f"queued ({job['training_type']} of {job['model']})")

    def _launch(self, job: dict[str, Any]) -> None:
        started = job["started_at"] or int(time.time())
        if not self.store.update("jobs", job["id"], {"status": "RUNNING", "started_at": started},
                                 when_status=("QUEUING",)):
            return  # canceled in between
        folder = job_dir(self.data_dir, job)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.threads:  # read by torch when the worker starts
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        try:
            note(self.data_dir, job, "starting the training worker")
            with open(folder / "logs.txt", "ab") as log:
                self._proc = subprocess.Popen([sys.executable, "-m", "minipeft.platform.worker", str(folder)],
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=env, start_new_session=True)
        except OSError as e:  # no process slot, no file descriptor, no disk: a RUNNING job with no worker
            self._fail(job, f"the training worker could not be started: {e}", ENDING)  # would stay so for good
            return
        self._job_id = job["id"]

    def _end_worker(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(TERMINATE_GRACE)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = self._job_id = None

    def _reap(self) -> None:
        """Record the outcome of the worker, which has exited."""
        job = self.store.get("jobs", self._job_id)
        returncode, self._proc, self._job_id = self._proc.returncode, None, None
        self._finish(job, returncode)

    def _finish(self, job: dict[str, Any], returncode: int) -> None:
        """The worker exited: record its outcome (a cancel landing from here on is too late)."""
        result = read_result(self.data_dir, job)
        if returncode != 0 or "error" in result or not result:
            self._fail(job, result.get("error") or _exit_reason(returncode), ENDING)
            return
        try:
            model = publish(self.store, self.data_dir, job)
        except Exception as e:  # a full disk, say: the job failed, the server goes on
            self._fail(job, f"publishing the fine-tuned model failed: {e}; POST /api/v1/fine-tunes/{job['id']}/publish "
                       "tries again", ENDING)
            return
        self._end(job, {"status": "SUCCEEDED", "fine_tuned_model": model["name"]},
                  f"succeeded: fine-tuned model {model['name']}", ENDING)

    def _fail(self, job: dict[str, Any], error: str, when: tuple[str, ...]) -> None:
        self._end(job, {"status": "FAILED", "error": error}, f"failed: {error}", when)

    def _end(self, job: dict[str, Any], fields: dict[str, Any], text: str, when: tuple[str, ...]) -> None:
        """Set the final `fields` if the job is in one of `when`, and log `text` only if they were set."""
        fields = {**fields, "finished_at": int(time.time())}
        for status in when:  # one at a time, to know which it was
            if self.store.update("jobs", job["id"], fields, when_status=(status,)):
                late = "; a cancel came after the training had ended and was not applied" \
                    if status == "CANCELING" else ""
                note(self.data_dir, job, text + late)
                return

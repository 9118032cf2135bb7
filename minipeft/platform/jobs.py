"""Fine-tune jobs: the request (Bailian's names), its checks, the job directory, and what a job shows.

    POST /api/v1/fine-tunes {"model": "minillama-10m" | a fine-tuned model,
                             "training_file_ids": [...], "validation_file_ids": [...],
                             "training_type": "efficient_sft", "hyper_parameters": {"n_epochs": 3, ...}}

training_type -> TrainConfig.method: sft = full, efficient_sft = lora, and qlora, adapter, prefix,
prompt by their own names. hyper_parameters carry the trainer's names (split is the held-out
share, TrainConfig.test_ratio, used when no validation file is given: given with one it is
refused, as is a file given as both training and validation data). Everything is checked when
the job is created, so a job that reaches the queue fails only for reasons found while training.

Lifecycle: PENDING (accepted) -> QUEUING (its data copied into DATA_DIR/jobs/<id>/) -> RUNNING
-> SUCCEEDED | FAILED, or CANCELING -> CANCELED (or SUCCEEDED | FAILED when the cancel lands after
the training ended: too late, scheduler.py). The job directory holds train.jsonl (and
validation.jsonl), train_config.json, logs.txt, and output/ (run_job's directory: metrics.jsonl,
checkpoint-N/, adapter/ or model/, eval/metrics.json).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..checkpoint import read_config
from ..data import load_jsonl
from ..data.jsonl import dumps_line, write_atomic
from ..files import json_bytes
from ..templates import get_template
from ..tokenizer import load_tokenizer
from ..train_config import MAX_SEED, TrainConfig, check_method_keys
from ..train_state import list_checkpoints
from .errors import ApiError, not_found
from .files import file_path
from .models import continuation, resolve, trained_template
from .store import Store, new_id

TRAINING_TYPES = {"sft": "full", "efficient_sft": "lora", "qlora": "qlora", "adapter": "adapter",
                  "prefix": "prefix", "prompt": "prompt"}
ACTIVE = ("PENDING", "QUEUING", "RUNNING", "CANCELING")
FINISHED = ("SUCCEEDED", "FAILED", "CANCELED")
MAX_EPOCHS, MAX_BATCH, MAX_RANK, MAX_FILES = 100, 1024, 1024, 100


class HyperParameters(BaseModel):
    """Types and resource caps; TrainConfig checks the ranges (and says what it expected)."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    n_epochs: Optional[int] = Field(None, le=MAX_EPOCHS)
    batch_size: Optional[int] = Field(None, le=MAX_BATCH)
    gradient_accumulation_steps: Optional[int] = Field(None, le=MAX_BATCH)
    learning_rate: Optional[float] = None
    lr_scheduler_type: Optional[str] = None
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None
    max_grad_norm: Optional[float] = None
    max_length: Optional[int] = None
    packing: Optional[bool] = None
    split: Optional[float] = None
    eval_steps: Optional[int] = None
    logging_steps: Optional[int] = None
    save_strategy: Optional[str] = None
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = None
    lora_rank: Optional[int] = Field(None, le=MAX_RANK)
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    use_rslora: Optional[bool] = None
    template: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)


class FineTuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=200)
    training_file_ids: list[str] = Field(min_length=1, max_length=MAX_FILES)
    validation_file_ids: list[str] = Field(default_factory=list, max_length=MAX_FILES)
    training_type: Literal["sft", "efficient_sft", "qlora", "adapter", "prefix", "prompt"] = "efficient_sft"
    hyper_parameters: HyperParameters = Field(default_factory=HyperParameters)


def _check_model_fit(cfg: TrainConfig) -> None:
    """The template's tokens exist in the tokenizer and max_length fits the model's context."""
    try:
        get_template(cfg.template).render_prompt([{"role": "user", "content": "hi"}], load_tokenizer(cfg.model))
    except ValueError as e:
        raise ApiError(400, f"hyper_parameters.template: {e}", param="hyper_parameters.template") from None
    context = read_config(cfg.model).max_position_embeddings
    if cfg.max_length > context:
        raise ApiError(400, f"hyper_parameters.max_length={cfg.max_length} exceeds the model's context of "
                       f"{context} tokens", param="hyper_parameters.max_length")


def _check_validation(req: FineTuneRequest) -> None:
    """Validation data is held out: a file also trained on would make its loss and metrics say
    nothing about unseen data, and `split` would be ignored beside it (the split is taken only when
    there is no validation file). Refused, not warned about, as every setting a job would ignore is:
    a job's answer has no warnings a client shows, and the job would not measure what was asked."""
    if shared := [f for f in req.validation_file_ids if f in req.training_file_ids]:
        raise ApiError(400, f"file(s) {shared} are in both training_file_ids and validation_file_ids: the validation "
                       "data must be held out from training; upload held-out data, or leave validation_file_ids "
                       "out to hold out hyper_parameters.split of the training data", param="validation_file_ids")
    if req.validation_file_ids and req.hyper_parameters.split is not None:
        raise ApiError(400, "hyper_parameters.split is the share of training data held out when no "
                       "validation_file_ids are given; this request gives both, and the split would be ignored: "
                       "remove one of them", param="hyper_parameters.split")


def create_job(store: Store, bases: dict[str, Path], data_dir: Path, req: FineTuneRequest,
               device: str = "auto") -> dict[str, Any]:
    """Check the request and record the job as PENDING (the scheduler prepares and queues it);
    device: where it will train (the server's --train-device)."""
    source = resolve(store, bases, req.model)
    method = TRAINING_TYPES[req.training_type]
    settings = req.hyper_parameters.model_dump(exclude_none=True)
    try:  # lora_rank for a prefix job would be ignored; continuation() then fills in inherited keys of any block
        check_method_keys({key: key for key in settings}, method, "hyper_parameters")
    except ValueError as e:
        raise ApiError(400, f"{e} (training_type {req.training_type!r})", param="hyper_parameters") from None
    _check_validation(req)
    if "split" in settings:
        settings["test_ratio"] = settings.pop("split")
    settings.update(continuation(source, method, settings))
    if "template" not in settings and (saved := trained_template(source)):
        settings["template"] = saved  # else TrainConfig's default
    for file_id in req.training_file_ids + req.validation_file_ids:
        file_path(store, data_dir, file_id)
    job_id = new_id("ft")
    job_dir = data_dir / "jobs" / job_id
    try:
        cfg = TrainConfig(model=str(source.weights_dir), train_file=str(job_dir / "train.jsonl"),
                          test_file=str(job_dir / "validation.jsonl") if req.validation_file_ids else None,
                          output_dir=str(job_dir / "output"), method=method, device=device, **settings)
    except ValueError as e:  # TrainConfig names its test_ratio, which the request calls split
        raise ApiError(400, f"hyper_parameters: {str(e).replace('test_ratio=', 'split=')}",
                       param="hyper_parameters") from None
    _check_model_fit(cfg)
    return store.insert("jobs", {
        "id": job_id, "model": req.model, "base_model": source.base_model, "training_type": req.training_type,
        "hyper_parameters": req.hyper_parameters.model_dump(exclude_none=True),
        "training_file_ids": req.training_file_ids, "validation_file_ids": req.validation_file_ids,
        "config": cfg.to_dict(), "status": "PENDING", "resumes": 0, "interruptions": 0,
        "created_at": int(time.time())})


def _combine(paths: list[Path], target: Path) -> None:
    """One file is copied byte for byte (line numbers in errors stay the user's); several are
    merged as normalized {"messages": [...]} lines (the files may use different formats)."""
    if len(paths) == 1:
        write_atomic(target, [paths[0].read_bytes()])
    else:
        write_atomic(target, (dumps_line({"messages": e.messages}) for p in paths for e in load_jsonl(p)))


def prepare_job(store: Store, data_dir: Path, job: dict[str, Any]) -> None:
    """Copy the job's data into its directory and write train_config.json (idempotent)."""
    cfg = job["config"]
    for ids, key in ((job["training_file_ids"], "train_file"), (job["validation_file_ids"], "test_file")):
        if ids:
            try:
                _combine([file_path(store, data_dir, i) for i in ids], Path(cfg[key]))
            except ApiError as e:
                raise ValueError(f"{e.message} (it was deleted before the job started)") from None
    write_atomic(job_dir(data_dir, job) / "train_config.json", json_bytes(cfg))


def job_dir(data_dir: Path, job: dict[str, Any]) -> Path:
    return data_dir / "jobs" / job["id"]


def get_job(store: Store, job_id: str) -> dict[str, Any]:
    job = store.get("jobs", job_id)
    if job is None:
        raise not_found("fine-tune job", job_id, "GET /api/v1/fine-tunes lists the jobs")
    return job


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a file another process is appending to: a half-written last line is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def job_view(job: dict[str, Any], detail: bool = False) -> dict[str, Any]:
    """A job as the API shows it; `detail` adds its metrics so far and, when done, its evaluation."""
    cfg = job["config"]
    view = {k: v for k, v in job.items() if k != "config"}
    view["effective_hyper_parameters"] = {k: cfg[k] for k in HyperParameters.model_fields if k in cfg}
    # split: the held-out share of the training data, none where validation files are the test split
    view["effective_hyper_parameters"].update(split=None if cfg.get("test_file") else cfg["test_ratio"],
                                              method=cfg["method"])
    if detail:
        output = Path(cfg["output_dir"])
        view["metrics"] = _read_jsonl(output / "metrics.jsonl")
        report = output / "eval" / "metrics.json"
        view["evaluation"] = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
    return view


def read_logs(data_dir: Path, job: dict[str, Any], offset: int, line: int) -> dict[str, Any]:
    """Lines offset .. offset + line - 1 of the job's log (Bailian's `offset` and `line`). While the
    job is not finished, a last line without its newline is left out: the worker may be writing it
    (print writes the text and the newline apart), and a reader that counted it would ask for the
    next page from past it, never seeing its end."""
    path = job_dir(data_dir, job) / "logs.txt"
    data = path.read_bytes() if path.is_file() else b""
    if job["status"] not in FINISHED:
        data = data[:data.rfind(b"\n") + 1]
    lines = data.decode("utf-8", errors="replace").splitlines()
    return {"job_id": job["id"], "offset": offset, "total": len(lines), "logs": lines[offset:offset + line]}


def checkpoints(store: Store, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's checkpoints, oldest first (save_total_limit may rotate one out as this runs)."""
    published = {m["checkpoint"]: m["name"] for m in store.rows("models", job_id=job["id"])}
    found = []
    for path in list_checkpoints(Path(job["config"]["output_dir"])):
        try:
            created = int(path.stat().st_mtime)
        except FileNotFoundError:
            continue
        found.append({"checkpoint": path.name, "step": int(path.name.split("-")[1]), "created_at": created,
                      "model": published.get(path.name)})
    return found


def delete_job(store: Store, data_dir: Path, job: dict[str, Any]) -> None:
    """Delete a finished job and its directory; the models published from it stay."""
    if job["status"] not in FINISHED:
        raise ApiError(409, f"job {job['id']} is {job['status']}: cancel it first (only {', '.join(FINISHED)} "
                       "jobs can be deleted)")
    store.delete("jobs", job["id"])
    shutil.rmtree(job_dir(data_dir, job), ignore_errors=True)

"""The training worker: one job in its own process (scheduler.py starts it).

    python -m minipeft.platform.worker JOB_DIR

Reads JOB_DIR/train_config.json, runs run_job (resume=True: it continues from the newest
checkpoint in JOB_DIR/output when there is one, and starts fresh in an empty directory), then
evaluates the result on the validation file or the held-out split, as the outline's 5.2 asks:
generated replies scored by minipeft.evaluate, written to output/eval/metrics.json and samples.md.
It ends by writing JOB_DIR/result.json, {"train": {...}, "eval": {...}} with exit status 0, or
{"error": "..."} with status 1 after printing the traceback. Everything printed goes to the
job's logs.txt, including each metrics.jsonl row as the trainer writes it.

Two guards make restarts safe: the worker holds an exclusive lock on JOB_DIR/worker.lock while it
runs, so a worker started after a crash waits until an orphan of the old server has ended; and it
exits within a second of its parent (the server) dying, so orphans do not linger.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from ..checkpoint import load_pretrained
from ..data import load_jsonl, split_examples
from ..distributed import use_device
from ..evaluate import evaluate, write_report
from ..job import load_base, run_job
from ..files import json_bytes, write_atomic
from ..peft_model import PeftModel
from ..templates import load_template
from ..tokenizer import load_tokenizer
from ..train_config import TrainConfig
from ..train_state import latest_checkpoint
from ..trainer import read_metrics

EVAL_EXAMPLES = 50  # a platform evaluation is a quick check; `minipeft eval` runs a full one
EVAL_MAX_NEW_TOKENS = 64
FOLLOW_EVERY = 0.5


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


class NoProgressBars(io.TextIOBase):
    """stderr without tqdm's bars: each redraw is a write holding "\r", and closing a bar writes
    one "\n" after them; a log file would get them as one endless line. The metrics rows that
    follow_metrics prints take their place."""

    def __init__(self, stream: TextIO):
        self.stream, self.in_bar = stream, False

    def write(self, text: str) -> int:
        bar_end = self.in_bar and text == "\n"
        self.in_bar = "\r" in text
        if not (self.in_bar or bar_end):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl whose line the trainer has finished writing."""
    return read_metrics(path) if path.is_file() else []


def follow_metrics(path: Path, stop: threading.Event) -> None:
    """Print metrics.jsonl rows as they appear. A resume rewrites the file without the rows past
    its checkpoint; the rows already there when this starts are not printed again."""
    shown = len(_complete_rows(path))
    while True:
        done = stop.wait(FOLLOW_EVERY)
        rows = _complete_rows(path)
        for row in rows[min(shown, len(rows)):]:
            print(_format_row(row), flush=True)
        shown = len(rows)
        if done:
            return


def evaluate_job(cfg: TrainConfig) -> dict[str, Any]:
    """Score the trained model's generated replies on the validation file or the held-out split."""
    out = Path(cfg.output_dir)
    if cfg.test_file:
        examples = load_jsonl(cfg.test_file)
    else:  # the same split run_job held out
        examples = split_examples(load_jsonl(cfg.train_file), cfg.test_ratio, seed=cfg.seed)[1]
    if (out / "adapter").is_dir():
        base, tok = load_base(cfg)  # as trained: NF4 for QLoRA
        model, folder = PeftModel.from_pretrained(base, out / "adapter"), out / "adapter"
    else:
        folder = out / "model"
        model, tok = load_pretrained(folder, device=use_device(cfg.device)), load_tokenizer(folder)
    result = evaluate(model.eval(), tok, examples[:EVAL_EXAMPLES], load_template(folder),
                      max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=cfg.batch_size, progress=False)
    metrics_file, _ = write_report(result, out / "eval", sources={"model": cfg.model, "trained": str(folder)})
    return json.loads(metrics_file.read_text(encoding="utf-8"))


def run(folder: Path) -> int:
    result_file = folder / "result.json"
    result_file.unlink(missing_ok=True)
    stop = threading.Event()
    try:
        cfg = TrainConfig.load(folder / "train_config.json")
        last = latest_checkpoint(Path(cfg.output_dir))
        print(f"resuming from {last.name}" if last else f"training {cfg.method} on {cfg.model}", flush=True)
        follower = threading.Thread(target=follow_metrics, args=(Path(cfg.output_dir) / "metrics.jsonl", stop),
                                    daemon=True)
        follower.start()
        job = run_job(cfg, resume=True)
        stop.set()
        follower.join()
        r = job.result
        train = {"steps": r.steps, "train_loss": r.train_loss, **r.eval, "warnings": r.warnings,
                 "trainable_params": job.trainable, "total_params": job.total, "seconds": r.seconds}
        print(f"training done: {_format_row({k: v for k, v in train.items() if k != 'warnings'})}", flush=True)
        evaluation = evaluate_job(cfg)
        print(f"evaluation ({evaluation['task']}): {_format_row(evaluation['metrics'])}", flush=True)
        write_atomic(result_file, json_bytes({"train": train, "eval": evaluation}))
        return 0
    except Exception as e:
        stop.set()
        traceback.print_exc()
        write_atomic(result_file, json_bytes({"error": f"{type(e).__name__}: {e}"}))
        return 1


def _watch_parent(parent: int) -> None:
    def check() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(3)  # the server is gone; its successor re-queues this job
    threading.Thread(target=check, daemon=True).start()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m minipeft.platform.worker JOB_DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    sys.stderr = NoProgressBars(sys.stderr)
    with open(folder / "worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _watch_parent(os.getppid())
        return run(folder)


if __name__ == "__main__":
    sys.exit(main())

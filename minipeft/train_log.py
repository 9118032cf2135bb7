"""A training run's logs: metrics.jsonl (one JSON object per logged step or evaluation) and, when
tensorboard is installed, TensorBoard scalars beside it; both cut back to the checkpoint on resume."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

from .files import strict_json, write_atomic
from .train_config import TrainConfig


def tensorboard_dir(cfg: TrainConfig) -> Optional[Path]:
    """Where TensorBoard event files go (output_dir/tensorboard), or None: report_to "none", or
    "auto" without the tensorboard package. "tensorboard" without it is an error, not a silent skip."""
    if cfg.report_to == "none":
        return None
    if importlib.util.find_spec("tensorboard") is None:
        if cfg.report_to == "tensorboard":
            raise ValueError("report_to='tensorboard' needs the tensorboard package: pip install tensorboard")
        return None
    return Path(cfg.output_dir) / "tensorboard"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records. A last line without its newline was cut short by a process killed
    mid-append: it is dropped (its step is past every checkpoint, so that work is redone); any
    other line that is not a JSON object with an integer "step" is an error naming file and line."""
    *lines, _ = path.read_text(encoding="utf-8").split("\n")  # _: "", or a line cut short
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f'{path}: line {number}: expected a JSON object with an integer "step"')
        rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step or evaluation, flushed as written; with a
    tensorboard directory, each number also becomes a scalar there (tag "train/loss",
    "eval/eval_loss", ..., at its step). On resume, records past the checkpoint's step are dropped:
    that work is redone and logged again (TensorBoard hides its events past the checkpoint)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True, tensorboard: Optional[Path] = None):
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, Any]] = []
        if path.exists() and resume_step:
            self.rows = [r for r in read_metrics(path) if r["step"] <= resume_step]
        if enabled:
            write_atomic(path, "".join(strict_json(r, indent=None) + "\n" for r in self.rows))
        self.writer = None
        if enabled and tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: the first step logged again; the checkpoint's own step keeps its events
            self.writer = SummaryWriter(str(tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(strict_json(row, indent=None) + "\n")  # an eval perplexity past float64 as null
        if self.writer is not None:
            group = "eval" if any(k.startswith("eval_") for k in row) else "train"
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"{group}/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

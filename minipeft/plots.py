"""Training curves as PNG: loss (train and eval on one plot) and learning rate against the step."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from .files import write_atomic


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """rows: metrics.jsonl records ({"step", "loss", "lr"} and {"step", "eval_loss"}) -> PNG at path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    # A line needs two points: a run shorter than logging_steps logs one train row (its last step),
    # which a bare line would not draw at all; markers show it.
    style = "o-" if len(train) == 1 else "-"
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    if train:  # no legend entry for a line that is not there
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], style, color="tab:blue",
                     label="train loss")
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], style, color="tab:green")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                     label="eval loss")  # its colour whether or not a train line comes first
    ax_loss.set_ylabel("loss (mean NLL per token)")
    if train or evals:
        ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path

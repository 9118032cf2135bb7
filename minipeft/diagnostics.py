"""What the outline teaches to read off the curves (section 4.2), checked while training runs.

- learning rate too large -> the loss is unstable: it rises, or swings widely, early in training;
- too many epochs -> over-fitting: the eval loss rises while the training loss still falls;
- a non-finite loss is fatal: the run stops and keeps its last good checkpoint (the trainer).
Each check returns a message (or None) that the trainer prints once and writes to the report.
"""
from __future__ import annotations

from statistics import mean
from typing import Optional, Sequence


def unstable_loss(losses: Sequence[float], window: int = 5) -> Optional[str]:
    """Early logged training losses -> a warning if they rise or oscillate.

    Rising: the mean of the last `window` losses exceeds the starting loss (mean of the first 3,
    taken while warm-up keeps updates small) by 10%: a sound learning rate never leaves the loss
    above where it started. Oscillating: within the last 2*window, the loss changes direction
    at most steps, its swings exceed 25% of its level, and it made no progress (the mean of the
    last window is not below the one before): small batches make a falling loss zigzag too, and
    that is noise, not a learning rate too large. Checked on the first epoch only.
    """
    if len(losses) < 3 + window:
        return None
    start, last = mean(losses[:3]), mean(losses[-window:])
    if last > 1.1 * start:
        return (f"training loss is rising early ({start:.3f} -> {last:.3f}): the learning rate may be too "
                "large; try a smaller learning_rate or a longer warm-up")
    recent = losses[-2 * window:]
    diffs = [b - a for a, b in zip(recent, recent[1:])]
    turns = sum(1 for a, b in zip(diffs, diffs[1:]) if a * b < 0)
    if len(recent) == 2 * window and turns >= 0.7 * (len(diffs) - 1) and \
            (max(recent) - min(recent)) > 0.25 * mean(recent) and mean(recent[window:]) >= mean(recent[:window]):
        return (f"training loss oscillates (between {min(recent):.3f} and {max(recent):.3f}): the learning "
                "rate may be too large")
    return None


def overfitting(evals: Sequence[tuple[float, float]]) -> Optional[str]:
    """(train loss, eval loss) at successive evaluations -> a warning when, twice in a row, the eval
    loss rose while the training loss fell."""
    if len(evals) < 3:
        return None
    (t0, e0), (t1, e1), (t2, e2) = evals[-3:]
    if e2 > e1 > e0 and t2 < t1 < t0:
        return (f"eval loss rises ({e0:.3f} -> {e2:.3f}) while training loss falls ({t0:.3f} -> {t2:.3f}): "
                "over-fitting; use fewer epochs or more data")
    return None

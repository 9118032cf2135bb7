"""Learning-rate schedules: the multiplier of the peak learning rate at optimizer step `step`.

All start with a linear warm-up from 0 over `warmup` steps (the outline's warmup_ratio x total
steps): early updates from a freshly initialized adapter are noisy, and a full-size step then can
throw the model off. After warm-up (`p` = fraction of the remaining steps done):
    linear                 1 - p                       (to 0 at the last step)
    cosine                 (1 + cos(pi p)) / 2
    constant               1 (no warm-up)
    constant_with_warmup   1
    inverse_sqrt           sqrt(warmup / step)         (continuous at the end of warm-up)
Equal to transformers' get_scheduler for the same names (tests/test_schedule.py).
"""
from __future__ import annotations

import math


def lr_factor(name: str, step: int, total: int, warmup: int) -> float:
    """Multiplier for the update that follows `step` completed steps (0-based, as LambdaLR)."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "inverse_sqrt":
        timescale = warmup or 10_000  # transformers' default when there is no warm-up
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    p = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - p)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    raise ValueError(f"unknown lr_scheduler_type {name!r}")

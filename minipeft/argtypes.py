"""argparse types shared by the command-line tools: values checked when the arguments are parsed, before
any work (loading a model can take minutes)."""
from __future__ import annotations

import argparse
from typing import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low."""
    def integer(text: str) -> int:  # argparse names the function in its errors ("invalid integer value")
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return integer


def probability(text: str) -> float:
    """An argparse type: a float in [0, 1] (top-p)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value

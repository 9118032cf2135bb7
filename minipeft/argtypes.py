"""argparse types shared by the command-line tools: values checked when the arguments are parsed, before
any work (loading a model can take minutes)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an int >= low (and <= high if given: a seed past torch's 64 bits is an
    OverflowError that names no flag)."""
    def integer(text: str) -> int:  # argparse names the function in its errors ("invalid integer value")
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value
    return integer


def finite_float(low: float, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float >= low (> low if `above`). float() takes "nan" and "inf", which
    pass or fail every comparison: a NaN threshold turns a check off, a NaN length crashes later."""
    relation = ">" if above else ">="

    def number(text: str) -> float:  # argparse names the function in its errors ("invalid number value")
        value = float(text)
        if not (math.isfinite(value) and (value > low if above else value >= low)):
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {low:g}, got {text}")
        return value
    return number


def fraction(text: str) -> float:
    """An argparse type: a float in (0, 1] (a share that cannot be nothing)."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def probability(text: str) -> float:
    """An argparse type: a float in [0, 1] (top-p)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value

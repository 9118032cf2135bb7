"""argparse types shared by the command-line tools: values checked when the arguments are parsed, before
any work (loading a model can take minutes)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Optional

from .files import check_output_dir

# The largest count a size flag takes: torch's thread count and SentencePiece's vocabulary are C ints, and a
# dimension past it made torch.empty's "Overflow when unpacking long long", a traceback naming no flag.
MAX_COUNT = 2**31 - 1


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


def nonempty(what: str) -> Callable[[str], str]:
    """An argparse type: any text but the empty string, which a path would read as "." (the current
    directory: a dataset's folder to split into, a report written over the work tree) and a flag with
    a default would take for "left out" (`--base "$UNSET"`: the shipped model, silently)."""
    def value(text: str) -> str:  # argparse names the function in its errors ("invalid value value")
        if not text:
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty string")
        return text
    return value


def device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (distributed.DEVICES); whether this machine has the
    GPU is use_device's to say, when the command runs."""
    from .distributed import DEVICES  # imports torch: only when a --device is parsed

    if not DEVICES.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def check_file_to_write(path: str, flag: str) -> None:
    """A ValueError naming `flag` unless `path` can be written as a file: not a directory, and a new
    one's folder can be created and written (check_output_dir's test, on the file's own path). For the
    run functions, before their work: argparse cannot know what a later flag changes."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path}: is a directory; expected a file to write")
    check_output_dir(Path(path) if not Path(path).exists() else Path(path).parent, flag)

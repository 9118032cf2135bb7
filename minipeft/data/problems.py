"""What the data layer says when something is wrong: a `Problem` names the file, the line, the
field and what was expected, printed the way compilers do (`path:line:column: field: message`) so
editors can jump to it. `DataError` carries the whole list; `UsageError` is a bad command line or
an unreadable path (exit status 2), as opposed to bad data (exit status 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

# A DataError message shows this many problems; the rest are one `minipeft data check` away.
SHOWN_IN_ERROR = 20


@dataclass(frozen=True)
class Problem:
    path: str
    line: Optional[int]  # 1-based; None for a problem of the whole file
    field: Optional[str]  # e.g. "output", "messages[2].role"; None when the line itself is wrong
    message: str  # what is wrong, what was expected, and how to fix it
    column: Optional[int] = None  # 1-based, for invalid JSON
    keep: bool = False  # the line still counts as valid (a stripped BOM, a typo warning); line None: the
    # whole file, whose every line it rejects unless keep
    kind: str = "field"  # for counting: encoding, blank, json, format, field, typo, length, empty

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.column is not None:
            where += f":{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    @property
    def reason(self) -> str:
        """The problem without its location, as written on each line of a rejects file."""
        text = f"{self.field}: {self.message}" if self.field else self.message
        return text if self.column is None else f"column {self.column}: {text}"


class DataError(ValueError):
    """Invalid training data. `problems` lists every one found, each with file, line and field."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:SHOWN_IN_ERROR])
        more = len(problems) - SHOWN_IN_ERROR
        tail = f"\n  ... and {more} more; `minipeft data check FILE` lists them all" if more > 0 else ""
        super().__init__(f"{len(problems)} problem(s) in the data:\n{shown}{tail}")


class UsageError(ValueError):
    """A command line that cannot run (missing file, conflicting options): exit status 2."""


def line_ranges(lines: Iterable[int], limit: int = 12) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"; past `limit` ranges the rest is counted, not listed."""
    ranges: list[list[int]] = []
    for n in sorted(lines):
        if ranges and n == ranges[-1][1] + 1:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return text + (f", ... ({len(ranges) - limit} more ranges)" if len(ranges) > limit else "")

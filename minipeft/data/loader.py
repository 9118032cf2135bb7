"""Read a JSONL file into normalized `Example`s, collecting every problem instead of stopping at
the first: bytes -> lines (jsonl.py) -> JSON objects -> one format per file -> messages
(formats.py).

The file's format is its most common one (ties: the first seen). A line in another format is an
error naming both; one extra problem for the whole file lists which lines use which format, so a
file concatenated from two sources is easy to untangle.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from .formats import FORMATS, Example, detect_format, normalize
from .jsonl import PathLike, RawLine, parse_line, read_lines
from .problems import DataError, Problem, line_ranges


@dataclass
class LoadResult:
    path: str
    lines: list[RawLine]  # every line of the file
    parsed: list[Example]  # lines whose record normalized, before rejections for other reasons
    problems: list[Problem]  # sorted by line; problems of the whole file last
    format: Optional[str]  # the file's format (a key of FORMATS), None if no line had one

    @property
    def rejected(self) -> dict[int, list[Problem]]:
        """Line number -> the problems that reject it (problems with keep=True do not)."""
        out: dict[int, list[Problem]] = {}
        for p in self.problems:
            if p.line is not None and not p.keep:
                out.setdefault(p.line, []).append(p)
        return out

    @property
    def examples(self) -> list[Example]:
        """The examples of the valid lines: every line is either here or in `rejected`."""
        rejected = self.rejected
        return [e for e in self.parsed if e.line not in rejected]

    def add(self, problems: list[Problem]) -> None:
        self.problems = sorted(self.problems + problems, key=lambda p: (p.line is None, p.line or 0))


def read_file(path: PathLike) -> LoadResult:
    """Every line of `path`, the examples it holds and the problems found. Never raises for bad
    data (only UsageError when the file cannot be read)."""
    name = str(path)
    lines = read_lines(path)
    problems: list[Problem] = []
    parsed, formats = [], {}
    for line in lines:
        record, found = parse_line(name, line)
        problems += found
        if record is None:
            continue
        fmt, issue = detect_format(record)
        if fmt is None:
            problems.append(Problem(name, line.number, *issue, kind="format"))
            continue
        formats[line.number] = fmt
        messages, issues = normalize(record, fmt)
        problems += [Problem(name, line.number, field, message) for field, message in issues]
        if not issues:
            parsed.append(Example(name, line.number, messages, record, fmt))
    if not lines:
        problems.append(Problem(name, None, None, "the file is empty; expected one JSON example per line",
                                kind="empty"))
    file_format, mixed = _one_format(name, formats)
    result = LoadResult(name, lines, parsed, [], file_format)
    result.add(problems + mixed)
    return result


def _one_format(path: str, formats: dict[int, str]) -> tuple[Optional[str], list[Problem]]:
    counts = Counter(formats.values())
    if len(counts) <= 1:
        return next(iter(counts), None), []
    main = counts.most_common(1)[0][0]
    problems = [Problem(path, n, None, f"format {fmt!r}, but this file is {main!r} ({counts[main]} lines); "
                        f"one file must use one format: {main} is {FORMATS[main]}", kind="format")
                for n, fmt in formats.items() if fmt != main]
    by_format = {fmt: [n for n, f in formats.items() if f == fmt] for fmt in counts}
    listing = "; ".join(f"{fmt} on lines {line_ranges(lines)}" for fmt, lines in by_format.items())
    problems.append(Problem(path, None, None, f"mixes formats: {listing}", kind="format"))
    return main, problems


def load_jsonl(path: PathLike) -> list[Example]:
    """The examples of a JSONL file in any format of formats.py, normalized to messages.
    Raises DataError listing every problem (file, line, field) if any line is not clean."""
    result = read_file(path)
    if result.problems:
        raise DataError(result.problems)
    return result.examples

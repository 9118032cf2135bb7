"""Read a JSONL file into normalized `Example`s, collecting every problem instead of stopping at
the first: bytes -> lines (jsonl.py) -> JSON objects -> one format per file -> messages
(formats.py).

The file's format is its most common one (ties: the first seen). A line in another format is an
error naming both; one extra problem for the whole file lists which lines use which format, so a
file concatenated from two sources is easy to untangle. A "conversations" array that shows no
spelling (empty, or no object turn: formats.turn_spelling) counts as no format, only as the
errors it has. A UTF-16/32 file, or one whose lines end in a CR alone, is one problem of the
whole file, which rejects every line (none is read).
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from ..tokenizer import CHAT_TOKENS
from .formats import (FORMATS, Example, detect_format, normalize, special_token_issues, turn_spelling,
                      typo_warnings)
from .jsonl import PathLike, RawLine, cr_only, parse_line, read_lines, wide_encoding
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
        """Line number -> the problems that reject it (problems with keep=True do not; one of the
        whole file, line None, rejects every line)."""
        out: dict[int, list[Problem]] = {}
        whole = [p for p in self.problems if p.line is None and not p.keep]
        for p in self.problems:
            if p.line is not None and not p.keep:
                out.setdefault(p.line, []).append(p)
        return {line.number: out.get(line.number, []) + whole for line in self.lines
                if line.number in out or whole}

    @property
    def examples(self) -> list[Example]:
        """The examples of the valid lines: every line is either here or in `rejected`."""
        rejected = self.rejected
        return [e for e in self.parsed if e.line not in rejected]

    @property
    def warnings(self) -> list[Problem]:
        """Typo warnings: a file whose only problems these are is used (training, upload, split)."""
        return [p for p in self.problems if p.kind == "typo"]

    @property
    def errors(self) -> list[Problem]:
        """Every other problem, a stripped BOM included (only the clean copy of `data check`
        drops it): one keeps the file from being used as it is."""
        return [p for p in self.problems if p.kind != "typo"]

    def add(self, problems: list[Problem]) -> None:
        self.problems = sorted(self.problems + problems, key=lambda p: (p.line is None, p.line or 0))


def read_file(path: PathLike, special_tokens: Sequence[str] = CHAT_TOKENS) -> LoadResult:
    """Every line of `path`, the examples it holds and the problems found. Never raises for bad
    data (only UsageError when the file cannot be read). Content holding one of `special_tokens`
    is rejected (the tokenizer would read it as that token); an unknown key that looks like a
    typo of a known one is a warning (keep=True: the line stays valid)."""
    name = str(path)
    lines = read_lines(path)
    wide = wide_encoding(lines[0].data) if lines else None
    if wide is not None:
        encoding, bom = wide
        how = "byte-order mark" if bom else "no byte-order mark, NUL bytes between the characters"
        source = encoding[:-2] if bom else encoding  # "UTF-16": iconv reads the byte order from the BOM
        return _unreadable(name, lines, f"{encoding} file ({how}); JSONL must be UTF-8: re-encode it "
                           f"(iconv -f {source} -t UTF-8 FILE > NEW.jsonl)")
    if cr_only(lines):  # else its records read as one line of "Extra data"
        return _unreadable(name, lines, "line endings are CR only (classic Mac): convert to LF or CRLF "
                           "(tr '\\r' '\\n' < FILE > NEW.jsonl)")
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
        if fmt != "conversations" or turn_spelling(record[fmt]) is not None:
            formats[line.number] = fmt  # an empty array is no more role/content than ShareGPT: no format
        messages, issues = normalize(record, fmt)
        problems += [Problem(name, line.number, field, message) for field, message in issues]
        if issues:  # the checks below only on a line that reads: its field errors already hint at typos
            continue
        problems += [Problem(name, line.number, field, message, kind="special")
                     for field, message in special_token_issues(record, special_tokens)]
        problems += [Problem(name, line.number, field, message, keep=True, kind="typo")
                     for field, message in typo_warnings(record)]
        parsed.append(Example(name, line.number, messages, record, fmt))
    if not lines:
        problems.append(Problem(name, None, None, "the file is empty; expected one JSON example per line",
                                kind="empty"))
    file_format, mixed = _one_format(name, formats)
    result = LoadResult(name, lines, parsed, [], file_format)
    result.add(problems + mixed)
    return result


def _unreadable(path: str, lines: list[RawLine], why: str) -> LoadResult:
    """The result for a file read no further: one problem of the whole file, rejecting every line."""
    result = LoadResult(path, lines, [], [], None)
    result.add([Problem(path, None, None, why, kind="encoding")])
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
    # keep=True: the lines above are rejected one by one, this one only sums them up
    problems.append(Problem(path, None, None, f"mixes formats: {listing}", keep=True, kind="format"))
    return main, problems


def load_jsonl(path: PathLike, special_tokens: Sequence[str] = CHAT_TOKENS) -> list[Example]:
    """The examples of a JSONL file in any format of formats.py, normalized to messages.
    Raises DataError listing every problem (file, line, field) if there is an error; typo
    warnings alone are printed to stderr and the file is used."""
    result = read_file(path, special_tokens)
    if result.errors:
        raise DataError(result.problems)
    print_warnings(result)
    return result.examples


def print_warnings(result: LoadResult) -> None:
    """Each typo warning once, on stderr: `warning: file:line: key: message` at its first line, and
    on how many more lines it recurs (a metadata key on every line of a big file is one line here)."""
    first: dict[tuple, Problem] = {}
    count: Counter = Counter()
    for p in result.warnings:
        key = (p.path, p.field, p.message)
        first.setdefault(key, p)
        count[key] += 1
    for key, p in first.items():
        more = f" (and on {count[key] - 1} more lines)" if count[key] > 1 else ""
        print(f"warning: {p}{more}", file=sys.stderr)

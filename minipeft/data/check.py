"""`minipeft data check`: every problem of a data file, and optionally a clean copy.

A line is valid when it is one well-formed example (loader.py) and, given max_length, fits once
rendered by the chat template (measure.py): a longer example is rejected, because training drops
it (job.render_all renders with truncation="drop"). With a tokenizer, content holding one of its
special tokens' text is rejected too (loader.read_file), besides the chat tokens always checked.
Exit status: 0 when nothing at all was found (a stripped BOM or a typo warning still counts: the
file is not clean), 1 otherwise. The clean copy holds the valid lines byte for byte (minus a BOM),
the rejects file holds each other line as {"file", "line", "text", "reasons"}; valid + rejected =
lines of the input, blank lines included (rejected as "blank line"). Both written atomically.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

from ..templates import ChatTemplate, get_template
from ..tokenizer import CHAT_TOKENS
from .formats import Example
from .jsonl import PathLike, check_not_input, dumps_line, write_atomic
from .loader import LoadResult, read_file
from .measure import DEFAULT_TEMPLATE, Encoder, measure
from .problems import Problem


def check_file(path: PathLike, tokenizer: Optional[Encoder] = None, max_length: Optional[int] = None,
               template: Optional[ChatTemplate] = None) -> LoadResult:
    """read_file plus the length check (when max_length is given, which needs a tokenizer):
    each example rendered by `template` (default: plain), as training will render it."""
    result = read_file(path, special_tokens(tokenizer))
    if max_length is not None:
        if tokenizer is None:
            raise ValueError("max_length counts tokens: give a tokenizer too")
        template = template or get_template(DEFAULT_TEMPLATE)
        result.add([p for e in result.examples if (p := _length_problem(result.path, e, tokenizer, template,
                                                                        max_length))])
    return result


def _length_problem(path: str, example: Example, tokenizer: Encoder, template: ChatTemplate,
                    max_length: int) -> Optional[Problem]:
    total, _ = measure(example.messages, tokenizer, template)
    if total <= max_length:
        return None
    why = f"{total} tokens > max_length {max_length}: dropped, as training drops it"
    return Problem(path, example.line, None, why, kind="length")


def special_tokens(tokenizer: Optional[Encoder]) -> tuple[str, ...]:
    """The chat tokens, plus the tokenizer's own special tokens: content may hold none of them.
    (minipeft's Tokenizer names its special tokens; a test double may not.)"""
    return tuple(dict.fromkeys(CHAT_TOKENS + tuple(getattr(tokenizer, "special_tokens", ()))))


def write_clean(result: LoadResult, output: PathLike, rejects: PathLike) -> tuple[int, int]:
    """Write the valid lines to `output` and the others, with reasons, to `rejects`.
    Returns (valid, rejected) line counts, which add up to the input's lines. Neither may be the
    input file (UsageError, nothing written)."""
    if Path(output).resolve() == Path(rejects).resolve():
        raise ValueError(f"{output}: the clean file and the rejects file must differ")
    check_not_input(output, result.path, "--output")
    check_not_input(rejects, result.path, "--rejects")
    rejected = result.rejected
    write_atomic(output, (line.body + b"\n" for line in result.lines if line.number not in rejected))
    write_atomic(rejects, (dumps_line({"file": result.path, "line": line.number, "text": line.text,
                                       "reasons": [p.reason for p in rejected[line.number]]})
                           for line in result.lines if line.number in rejected))
    return len(result.lines) - len(rejected), len(rejected)


def default_rejects_path(output: PathLike) -> Path:
    """CLEAN.jsonl -> CLEAN.rejects.jsonl beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejects{output.suffix or '.jsonl'}")


def summary(result: LoadResult) -> str:
    """One paragraph: lines, format, valid/rejected, and problems by kind."""
    rejected = result.rejected
    valid = len(result.lines) - len(rejected)
    text = (f"{result.path}: {len(result.lines)} lines, format {result.format or 'unknown'}: "
            f"{valid} valid, {len(rejected)} rejected")
    kinds = Counter("too long" if p.kind == "length" else p.kind for p in result.problems)
    if kinds:
        text += "; problems: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    return text

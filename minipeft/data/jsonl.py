"""JSONL at the byte level: split a file into lines that remember where they came from, decode
and parse each one strictly, and write files atomically.

A line is the bytes between two b"\\n" (a trailing "\\r" is JSON whitespace, so Windows files
parse). Strict means: UTF-8 only (the first bad byte is reported by its offset in the file, with
the encodings that read the line instead, or how UTF-8 text was damaged: encoding_hint), no
byte-order mark, no blank lines, one JSON object per line, no NaN/Infinity (not JSON, though
Python's json accepts them), no key given twice (json.loads would silently keep the last) and no
unpaired surrogate: json.loads accepts the escape "\\ud83d" alone (exporters that slice UTF-16
strings write it), but it is not a character, and tokenizers and UTF-8 writers fail on it.
Nothing here drops a line: every line comes back with the problems found on it.

A UTF-16 or UTF-32 file (what Windows PowerShell 5's `>` writes) is recognized by its byte-order
mark, or by NUL bytes around its first character (UTF-8 JSON holds no NUL byte); its lines are
split on its own newline, so the file is reported once, as a whole, with how to re-encode it.
So is a file whose lines end in a CR alone (classic Mac): split on LF, it is one line.
"""
from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from .. import files
from .problems import Problem, UsageError

BOM = b"\xef\xbb\xbf"
# UTF-32 first: its little-endian mark starts with UTF-16's.
WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe", "UTF-16LE"),
             (b"\xfe\xff", "UTF-16BE"))
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNDECODED = re.compile("[\udc80-\udcff]+")  # bytes that are not UTF-8, as errors="surrogateescape" reads them
# What a line that is not UTF-8 is tried in, (Python codec, iconv name, what people call it): the usual
# encodings of training text that is not UTF-8, from Chinese, Japanese and Western-European Windows.
LEGACY_ENCODINGS = (("gb18030", "GB18030", "GBK"), ("cp932", "CP932", "Shift-JIS"),
                    ("cp1252", "CP1252", "Windows Latin-1"))
READING_CONTEXT = 8  # characters shown on each side of the bad byte, as each encoding reads them
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class RawLine:
    number: int  # 1-based line number
    offset: int  # byte offset of the line's first byte in the file
    data: bytes  # the line as stored, without its "\n"

    @property
    def body(self) -> bytes:
        """The line without a leading BOM: what a clean copy of the file holds."""
        return self.data[len(BOM):] if self.data.startswith(BOM) else self.data

    @property
    def text(self) -> str:
        """The line as text for messages and rejects files; undecodable bytes become lone surrogates
        (errors="surrogateescape"), so `text.encode("utf-8", "surrogateescape")` gives the bytes back."""
        return self.data.decode("utf-8", "surrogateescape")


def read_lines(path: PathLike) -> list[RawLine]:
    """All lines of `path`. A final "\\n" ends the last line rather than starting an empty one."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
    pieces, newline = _split(data)
    if pieces[-1] == b"":
        pieces.pop()
    lines, offset = [], 0
    for number, piece in enumerate(pieces, start=1):
        lines.append(RawLine(number, offset, piece))
        offset += len(piece) + newline
    return lines


def wide_encoding(data: bytes) -> Optional[tuple[str, int]]:
    """(encoding, length of its byte-order mark, 0 if none) of a UTF-16/32 file starting with
    `data`, else None."""
    for bom, name in WIDE_BOMS:
        if data.startswith(bom):
            return name, len(bom)
    nul = tuple(b == 0 for b in data[:4])  # JSON starts with ASCII ('{"'): NUL padding shows the width
    name = {(False, True, True, True): "UTF-32LE", (True, True, True, False): "UTF-32BE",
            (False, True, False, True): "UTF-16LE", (True, False, True, False): "UTF-16BE"}.get(nul)
    return (name, 0) if name else None


def cr_only(lines: list[RawLine]) -> bool:
    """Whether a file's lines end in a CR alone (classic Mac OS, some old exporters): the file has
    no LF, so it reads as one line, with a CR inside it that more text follows. A raw CR is never
    part of a JSON string (that is written \\r), so it can only be a line end here."""
    return len(lines) == 1 and b"\r" in lines[0].data.rstrip(b" \t\r")


def _split(data: bytes) -> tuple[list[bytes], int]:
    """The file's lines as bytes, and the length of its newline: b"\\n", or its UTF-16/32 form.
    A UTF-16/32 file is split on decoded text, then each line re-encoded: the same bytes, cut at
    code-unit boundaries (b"\\n" alone would cut "\\n\\0" in two)."""
    wide = wide_encoding(data)
    if wide is not None:
        codec, skip = wide[0].lower(), wide[1]
        try:
            parts = data[skip:].decode(codec).split("\n")
        except UnicodeDecodeError:
            pass  # not valid UTF-16/32 after all: byte lines, each reported as not UTF-8
        else:
            pieces = [p.encode(codec) for p in parts]
            pieces[0] = data[:skip] + pieces[0]
            return pieces, len("\n".encode(codec))
    return data.split(b"\n"), 1


def parse_line(path: str, line: RawLine) -> tuple[Optional[dict[str, Any]], list[Problem]]:
    """The JSON object on `line` (None if there is none) and the problems found on the way."""
    problems = []
    if line.data.startswith(BOM):
        problems.append(Problem(path, line.number, None, f"UTF-8 byte-order mark (BOM) at byte offset {line.offset}; "
                                "save the file as UTF-8 without BOM (the clean copy drops it)", keep=True,
                                kind="encoding"))
    try:
        text = line.body.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = line.body[e.start]
        at = line.offset + (len(line.data) - len(line.body)) + e.start
        problems.append(Problem(path, line.number, None, f"not UTF-8: byte 0x{bad:02x} at byte offset {at}; "
                                f"{encoding_hint(line.body, e.start)}", kind="encoding"))
        return None, problems
    if not text.strip():
        problems.append(Problem(path, line.number, None, "blank line; JSONL needs one JSON object on every line",
                                kind="blank"))
        return None, problems
    record, problem = _loads(path, line.number, text)
    if problem:
        return None, problems + [problem]
    lone = [Problem(path, line.number, field, f"unpaired surrogate \\u{ord(m.group()):04x} at character {m.start()}: "
                    "half of a UTF-16 pair (an exporter cut the text?), not a character; remove it or restore "
                    "the whole character", kind="encoding")
            for field, value in strings(record) if (m := _SURROGATE.search(value))]
    return (None if lone else record), problems + lone


def encoding_hint(data: bytes, at: int) -> str:
    """How to make UTF-8 of a line `data` whose byte `at` is not UTF-8, naming only an encoding that
    reads it: a UTF-16/32 byte-order mark or NUL bytes, else each of LEGACY_ENCODINGS that decodes the
    line to text, shown as it reads around the bad byte (the person who wrote it sees which is right:
    GBK text also decodes as CP932 and CP1252, to nonsense), else none."""
    for bom, name in WIDE_BOMS:
        if data.startswith(bom):  # "UTF-16": iconv reads the byte order from the BOM
            return (f"it starts with a {name} byte-order mark: re-encode it "
                    f"(iconv -f {name[:-2]} -t UTF-8 FILE > NEW.jsonl)")
    damage = _damaged_utf8(data, at)
    if damage:
        return damage
    if b"\0" in data:
        return ("it holds NUL bytes, as UTF-16 and UTF-32 text does: re-encode it from the one it is in "
                "(e.g. iconv -f UTF-16LE -t UTF-8 FILE > NEW.jsonl)")
    readings = [(name, f"{name} ({alias}) {text!r}") for codec, name, alias in LEGACY_ENCODINGS
                if (text := _reading(data, at, codec)) is not None]
    if not readings:
        return (f"unknown encoding (not {_either([name for _, name, _ in LEGACY_ENCODINGS])} either): find the "
                "one it was written in and convert it (iconv -f ENCODING -t UTF-8 FILE > NEW.jsonl)")
    if len(readings) == 1:
        (name, reading), = readings
        return f"it reads as {reading}; re-encode the file: iconv -f {name} -t UTF-8 FILE > NEW.jsonl"
    return (f"it reads as {_either([r for _, r in readings])}; re-encode the file from the one that reads "
            "right: iconv -f ENCODING -t UTF-8 FILE > NEW.jsonl")


def _damaged_utf8(data: bytes, at: int) -> Optional[str]:
    """Why a line of UTF-8 text has a bad byte at `at`, when it is UTF-8 all the same: it ends inside
    a character (cut short), starts inside one (a line break written into a character), or more
    characters beyond ASCII decode than bytes fail (a stray or damaged byte). No other encoding is
    offered then: re-encoding a UTF-8 file from one garbles every other line."""
    try:
        data.rstrip(b"\r")[at:].decode("utf-8")  # a CRLF line's CR follows the cut character
    except UnicodeDecodeError as e:
        if e.start == 0 and e.reason == "unexpected end of data":
            return "the line ends inside a UTF-8 character: it was cut short; restore its end"
    if at == 0 and 0x80 <= data[0] < 0xC0:
        return ("the line starts inside a UTF-8 character (a continuation byte): the line before was cut "
                "there (a line break written into the text?); join the two lines")
    text = data.decode("utf-8", "surrogateescape")
    runs = _UNDECODED.findall(text)  # counted as runs: a byte inserted into a character spoils its others
    bad, good = len(runs), sum(c > "\x7f" for c in text) - sum(map(len, runs))
    if good <= bad:
        return None
    return (f"the rest of the line is UTF-8 ({good} non-ASCII characters decode; {bad} place(s) do not): a "
            "damaged or stray byte, not another encoding; remove it or restore the character there")


def _either(items: list[str]) -> str:
    """Two or more items as words: ["a", "b", "c"] -> "a, b or c"."""
    return ", ".join(items[:-1]) + f" or {items[-1]}"


def _reading(data: bytes, at: int, codec: str) -> Optional[str]:
    """`data` decoded with `codec` around byte `at`, or None when it does not decode to text: a wrong
    encoding meets bytes it has no character for, or gives control, unassigned or private-use ones."""
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return None
    if any(unicodedata.category(c) in ("Cc", "Cn", "Co") for c in text if c not in "\t\r"):  # JSON whitespace
        return None
    i = len(data[:at].decode(codec, "ignore"))  # the character the bad byte starts
    return text[max(0, i - READING_CONTEXT):i + READING_CONTEXT + 1]


def _loads(path: str, number: int, text: str) -> tuple[Optional[dict[str, Any]], Optional[Problem]]:
    repeated: list[str] = []

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(pairs)

    def not_json(name: str) -> Any:
        raise ValueError(f"{name} is not JSON; write null or a string")

    try:
        record = json.loads(text, object_pairs_hook=no_repeats, parse_constant=not_json)
    except json.JSONDecodeError as e:
        # "Unterminated string starting at", "Invalid control character at": json's message ends
        # where its position follows
        said = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else e.msg
        message = f"invalid JSON: {said}{_json_hint(text, e)}"
        return None, Problem(path, number, None, message, column=e.colno, kind="json")
    except ValueError as e:
        return None, Problem(path, number, None, f"invalid JSON: {e}", kind="json")
    except RecursionError:  # json.loads recurses once per level of [ or {: a line, not the process, fails
        return None, Problem(path, number, None, "invalid JSON: arrays or objects nested too deeply to read "
                             f"(Python's limit is about {sys.getrecursionlimit()} levels)", kind="json")
    if not isinstance(record, dict):
        return None, Problem(path, number, None, f"expected a JSON object {{...}}, got {json_type(record)}",
                             kind="json")
    if repeated:
        keys = ", ".join(repr(k) for k in dict.fromkeys(repeated))
        return None, Problem(path, number, None, f"key {keys} given twice in one object; keep one", kind="json")
    return record, None


def _json_hint(text: str, e: json.JSONDecodeError) -> str:
    """The usual cause of each JSON error, in words a person who wrote the file understands."""
    before = text[:e.pos].rstrip()
    if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):  # a string open to the end
        return (" (the line ends before the JSON does: cut short, or pretty-printed JSON? JSONL needs each "
                "example whole on one line)")
    if e.msg.startswith("Invalid control character"):
        return (f" (character U+{ord(text[e.pos]):04X} written raw in a string; JSON needs it escaped, "
                f"{json.dumps(text[e.pos])[1:-1]}, or removed)")
    if text[e.pos] == "'":
        return " (JSON strings and keys need double quotes, not single quotes)"
    if e.msg.startswith("Expecting property name") and before.endswith(",") and text[e.pos] == "}":
        return " (a trailing comma before '}' is not allowed in JSON)"
    if e.msg == "Extra data" and "\r" in text[len(before):e.pos]:
        return " (a CR alone ends a line here: the file mixes line endings; convert them to LF or CRLF)"
    if e.msg == "Extra data":
        return " (two JSON values on one line? put each example on its own line)"
    if unicodedata.category(text[e.pos]) in ("Cc", "Cf"):  # NUL, a BOM in the middle: invisible in editors
        return f" (an invisible character, U+{ord(text[e.pos]):04X}, is here; remove it)"
    if e.msg == "Expecting value" and before.endswith(",") and text[e.pos] == "]":
        return " (a trailing comma before ']' is not allowed in JSON)"
    return ""


def strings(value: Any, field: Optional[str] = None) -> Iterator[tuple[Optional[str], str]]:
    """(field, text) for every string in a parsed JSON value, object keys included, the field
    named as problems name it: "output", "history[0][1]", "conversations[2].value"."""
    if isinstance(value, str):
        yield field, value
    elif isinstance(value, dict):
        for key, item in value.items():
            name = key if field is None else f"{field}.{key}"
            yield name, key
            yield from strings(item, name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, f"{field or ''}[{i}]")


def json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value, for messages about wrong types."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def write_atomic(path: PathLike, chunks: Iterable[bytes]) -> None:
    """minipeft.files.write_atomic, with an unwritable place reported as a usage error (one line, no traceback)."""
    try:
        files.write_atomic(path, chunks)
    except OSError as e:
        raise UsageError(f"{path}: cannot write: {e.strerror or e}") from None


def check_not_input(path: PathLike, source: PathLike, flag: str) -> None:
    """A UsageError naming `flag` (the option that chose `path`) if writing `path` would replace
    the input file `source`, under any name (a symlink, another spelling): the input is read
    before anything is written, so it would be lost silently."""
    if Path(path).resolve() == Path(source).resolve():
        raise UsageError(f"{path} would overwrite the input file; choose another {flag}")
    try:  # and its folder can hold it: a file on the way read as "File exists" when the write failed
        files.check_output_dir(Path(path).parent, f"{flag} {path}: its folder")
    except ValueError as e:
        raise UsageError(str(e)) from None


def dumps_line(record: Any) -> bytes:
    """One JSONL line. Readable UTF-8 when possible; text holding undecodable bytes (lone
    surrogates) is written with \\u escapes instead, which json.loads reads back losslessly."""
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record).encode("ascii") + b"\n"

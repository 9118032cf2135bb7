"""Malformed JSONL, seeded: valid files of every format (built here), corrupted one way at a time,
must either load as json.loads reads the clean file line by line (datasets is not installed here)
or be rejected with problems naming the file and the exact 1-based line (blank lines counted):
never a traceback, never a dropped or altered example, never a line number off by one. The
loader, `minipeft data check` and `minipeft data report` are each held to it."""
from __future__ import annotations

import json
import random
import re
from typing import Callable, Optional

import pytest

from minipeft.data import DataError, load_jsonl, read_file
from minipeft.data.cli import main

BOM = b"\xef\xbb\xbf"
# Content with what naive readers get wrong: non-ASCII (a cut inside it is not UTF-8), quotes and
# backslashes, and U+2028 / U+0085, which str.splitlines() (not JSON) takes for line ends.
TEXTS = ["Translate: café ✓", 'say "hi" \\ back', "line\u2028separator", "next\u0085line", "中文 问题",
         "emoji 😀 ok", "tab\tinside", "plain words here"]


def record(fmt: str, i: int) -> dict:
    q, a = TEXTS[i % len(TEXTS)] + f" #{i}", TEXTS[(i + 3) % len(TEXTS)] + f" !{i}"
    if fmt == "instruction":
        return {"instruction": q, "input": "ctx é" if i % 2 else "", "output": a, "id": i}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    return {fmt: [{"role": "system", "content": "be brief"}] * (i % 2) + [{"role": "user", "content": q},
                                                                          {"role": "assistant", "content": a}]}


FORMATS = ("instruction", "conversations", "messages", "sharegpt")
OTHER = {"instruction": "messages", "conversations": "instruction", "messages": "sharegpt",
         "sharegpt": "conversations"}
N = 6


def dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


# A corrupted file: its lines, each (bytes, what the loader must make of it), the line separator
# and whether the last line ends with one. Expectations: ("ok", i) the line is original line i,
# loaded unchanged with no problem; ("flag", i) loaded unchanged, but with a problem on its line
# (a BOM); ("bad", None) rejected by a problem on its line. `whole`: words of a problem of the
# whole file, which rejects every line.
class Case:
    def __init__(self, lines, sep=b"\n", final=True, whole: Optional[str] = None):
        self.lines, self.sep, self.final, self.whole = lines, sep, final, whole

    @property
    def data(self) -> bytes:
        body = self.sep.join(b for b, _, _ in self.lines)
        return body + (self.sep if self.final and self.lines else b"")


def ok(lines):
    return [(b, "ok", i) for i, b in enumerate(lines)]


def replaced(lines, k, *new):
    return ok(lines)[:k] + [(b, "bad", None) for b in new] + ok(lines)[k + 1:]


def inside_string_positions(line: bytes) -> list[int]:
    """Byte offsets strictly inside a JSON string of `line` (after its opening quote)."""
    out, inside, escaped = [], False, False
    for i, c in enumerate(line):
        if inside and not escaped and c != ord('"'):
            out.append(i)
        if escaped:
            escaped = False
        elif c == ord("\\"):
            escaped = inside
        elif c == ord('"'):
            inside = not inside
    return out


def truncated_last(lines, rng, fmt):
    cut = rng.randrange(1, len(lines[-1]) - 1)
    return Case(ok(lines)[:-1] + [(lines[-1][:cut], "bad", None)], final=False)


def cut_mid_string(lines, rng, fmt):
    k = rng.randrange(len(lines))
    at = rng.choice(inside_string_positions(lines[k]))
    # the rest of the line lost, or moved to a line of its own (a newline written into the text)
    rest = [lines[k][at:]] if rng.random() < 0.5 else []
    return Case(replaced(lines, k, lines[k][:at], *rest))


def bom_at_start(lines, rng, fmt):
    return Case([(BOM + lines[0], "flag", 0)] + ok(lines)[1:])


def bom_starting_a_middle_line(lines, rng, fmt):  # files concatenated with `cat`
    k = rng.randrange(1, len(lines))
    return Case(ok(lines)[:k] + [(BOM + lines[k], "flag", k)] + ok(lines)[k + 1:])


def bom_between_tokens(lines, rng, fmt):
    k = rng.randrange(len(lines))
    return Case(replaced(lines, k, lines[k][:1] + BOM + lines[k][1:]))


def crlf(lines, rng, fmt):
    return Case(ok([b + b"\r" for b in lines]), final=rng.random() < 0.5)


def crlf_on_some_lines(lines, rng, fmt):
    return Case(ok([b + b"\r" * (rng.random() < 0.5) for b in lines]))


def cr_only(lines, rng, fmt):
    return Case(ok(lines), sep=b"\r", final=rng.random() < 0.5, whole="CR only")


def one_lone_cr(lines, rng, fmt):  # an LF file where one line ends in CR alone: two records on one line
    k = rng.randrange(len(lines) - 1)
    return Case(ok(lines)[:k] + [(lines[k] + b"\r" + lines[k + 1], "bad", None)] + ok(lines)[k + 2:])


def nul_byte(lines, rng, fmt):
    k = rng.randrange(len(lines))
    at = rng.randrange(len(lines[k]) + 1)
    return Case(replaced(lines, k, lines[k][:at] + b"\0" + lines[k][at:]))


def invalid_utf8(lines, rng, fmt):
    k = rng.randrange(len(lines))
    at = rng.randrange(len(lines[k]) + 1)
    bad = rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"])
    return Case(replaced(lines, k, lines[k][:at] + bad + lines[k][at:]))


def not_an_object(lines, rng, fmt):
    k = rng.randrange(len(lines))
    value = rng.choice([json.loads(lines[k]), list(json.loads(lines[k]).values()), "hello", 42, None, True])
    return Case(replaced(lines, k, dumps([value] if isinstance(value, dict) else value)))


def wrong_nested_type(lines, rng, fmt):
    k = rng.randrange(len(lines))
    rec = json.loads(lines[k])
    if fmt == "instruction":
        key = rng.choice(["instruction", "output", "input", "history"])
        rec[key] = rng.choice([7, 1.5, ["a", "b"], {"text": "x"}, True, [["only one"]]])
    else:
        role, content = ("from", "value") if fmt == "sharegpt" else ("role", "content")
        turns = rec["conversations" if fmt == "sharegpt" else fmt]
        turn = turns[rng.randrange(len(turns))]
        how = rng.choice(["number", "parts", "no role", "unknown role", "upper role", "role number"])
        if how == "number":
            turn[content] = 3
        elif how == "parts":
            turn[content] = [{"type": "image_url", "image_url": {"url": "x.png"}}]
        elif how == "no role":
            del turn[role]
        elif how == "unknown role":
            turn[role] = "bot"
        elif how == "upper role":
            turn[role] = turn[role].capitalize()
        else:
            turn[role] = 1
    return Case(replaced(lines, k, dumps(rec)))


def duplicated_key(lines, rng, fmt):
    k = rng.randrange(len(lines))
    key = rng.choice(list(json.loads(lines[k])))
    return Case(replaced(lines, k, b"{" + dumps(key) + b': "again", ' + lines[k][1:]))


def nan_literal(lines, rng, fmt):
    k = rng.randrange(len(lines))
    literal = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
    return Case(replaced(lines, k, lines[k][:-1] + b', "score": ' + literal + b"}"))


def blank_lines(lines, rng, fmt):
    out = ok(lines)
    for _ in range(rng.randrange(1, 4)):
        out.insert(rng.randrange(len(out) + 1), (rng.choice([b"", b"   ", b"\t", b"\r", b" \r"]), "bad", None))
    return Case(out)


def trailing_comma(lines, rng, fmt):
    k = rng.randrange(len(lines))
    line = lines[k]
    if rng.random() < 0.5 or b"]" not in line:
        return Case(replaced(lines, k, line[:-1] + b",}"))
    at = line.rindex(b"]")
    return Case(replaced(lines, k, line[:at] + b", " + line[at:]))


def surrounding_whitespace(lines, rng, fmt):  # JSON whitespace around the object: json.loads reads it
    return Case(ok([rng.choice([b" ", b"\t", b""]) + b + rng.choice([b" ", b"\t ", b""]) for b in lines]))


def no_final_newline(lines, rng, fmt):
    return Case(ok(lines), final=False)


def mixed_formats(lines, rng, fmt):
    out = ok(lines)
    for j in range(rng.randrange(1, 3)):  # fewer than half: the file stays `fmt`
        out.insert(rng.randrange(len(out) + 1), (dumps(record(OTHER[fmt], 50 + j)), "bad", None))
    return Case(out)


def utf16(lines, rng, fmt):
    codec = rng.choice(["utf-16", "utf-16-le", "utf-32"])
    case = Case(ok(lines), whole="UTF-")
    return case, (b"\n".join(lines) + b"\n").decode("utf-8").encode(codec)


CORRUPTIONS: list[Callable] = [
    truncated_last, cut_mid_string, bom_at_start, bom_starting_a_middle_line, bom_between_tokens, crlf,
    crlf_on_some_lines, cr_only, one_lone_cr, nul_byte, invalid_utf8, not_an_object, wrong_nested_type,
    duplicated_key, nan_literal, blank_lines, trailing_comma, surrounding_whitespace, no_final_newline,
    mixed_formats, utf16]


def valid_lines(fmt: str) -> list[bytes]:
    return [dumps(record(fmt, i)) for i in range(N)]


def build(corruption, fmt, seed):
    lines = valid_lines(fmt)
    made = corruption(lines, random.Random(f"{corruption.__name__}/{fmt}/{seed}"), fmt)
    case, data = made if isinstance(made, tuple) else (made, made.data)
    return lines, case, data


def assert_loaded_as_expected(path, lines, case: Case, data: bytes) -> set[int]:
    """The loader's verdict on every line against the case's; returns the lines it must flag."""
    result = read_file(path)
    reference = {e.line - 1: e for e in read_file(_pristine(path, lines)).examples}
    assert len(reference) == len(lines)  # the clean file loads whole
    for i, e in reference.items():  # ... as json.loads reads it line by line
        assert e.raw == json.loads(lines[i].decode("utf-8"))
    expected_lines = len(case.lines) if not case.whole else len(result.lines)
    assert len(result.lines) == expected_lines
    for p in result.problems:
        assert p.path == str(path)
        assert p.line is None or 1 <= p.line <= len(result.lines), str(p)
    if case.whole:
        assert any(p.line is None and case.whole in p.message for p in result.problems), result.problems
        assert not result.examples and len(result.rejected) == len(result.lines)
        return set(range(1, len(result.lines) + 1))
    examples = {e.line: e for e in result.examples}
    on_line = {}
    for p in result.problems:
        on_line.setdefault(p.line, []).append(p)
    flagged = set()
    for n, (_, kind, i) in enumerate(case.lines, start=1):
        if kind == "bad":
            assert n in result.rejected and n not in examples, (n, on_line.get(n))
            flagged.add(n)
            continue
        assert n in examples, (n, on_line.get(n))
        got, want = examples[n], reference[i]
        assert (got.messages, got.raw, got.format) == (want.messages, want.raw, want.format)
        if kind == "flag":
            assert on_line.get(n), n
            flagged.add(n)
        else:
            assert n not in on_line, on_line[n]
    if not case.lines:
        assert [p.kind for p in result.problems] == ["empty"]
    return flagged


def _pristine(path, lines):
    clean = path.with_name("pristine.jsonl")
    clean.write_bytes(b"".join(b + b"\n" for b in lines))
    return clean


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c.__name__)
def test_a_corrupted_file_loads_whole_or_names_every_bad_line(tmp_path, corruption, fmt, capsys):
    for seed in range(6):
        lines, case, data = build(corruption, fmt, seed)
        path = tmp_path / f"{seed}.jsonl"
        path.write_bytes(data)
        flagged = assert_loaded_as_expected(path, lines, case, data)
        # load_jsonl: the examples, or one DataError naming the first flagged line
        try:
            examples = load_jsonl(path)
        except DataError as e:
            assert flagged
            first = min(flagged) if not case.whole else None
            assert (f"{path}:{first}:" if first else f"{path}: ") in str(e), str(e)
        else:
            assert not flagged and len(examples) == len(case.lines)
        # `minipeft data check`: exit 1 and the flagged lines exactly, else 0
        capsys.readouterr()
        status = main(["data", "check", str(path)])
        out = capsys.readouterr().out
        named = {int(m.group(1)) for m in re.finditer(rf"^{re.escape(str(path))}:(\d+)", out, re.M)}
        assert status == (1 if flagged else 0), out
        assert named == (set() if case.whole else flagged), out
        # --drop-invalid: the clean copy loads with no problem, every kept example unchanged
        if flagged and not case.whole:
            clean = tmp_path / f"{seed}.clean.jsonl"
            assert main(["data", "check", str(path), "--drop-invalid", "--output", str(clean)]) == 1
            kept = read_file(clean)
            want = [i for _, kind, i in case.lines if kind != "bad"]
            assert not kept.problems and [e.raw for e in kept.examples] == [json.loads(lines[i]) for i in want]
            rejects = [json.loads(x) for x in clean.with_name(f"{seed}.clean.rejects.jsonl").read_bytes().splitlines()]
            assert [r["line"] for r in rejects] == [n for n, (_, kind, _) in enumerate(case.lines, 1) if kind == "bad"]


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c.__name__)
def test_the_report_counts_the_same_rejected_lines(tmp_path, corruption, capsys):
    lines, case, data = build(corruption, "messages", 0)
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    flagged = assert_loaded_as_expected(path, lines, case, data)
    status = main(["data", "report", str(path), "--output", str(tmp_path / "report")])
    out = capsys.readouterr().out
    if case.whole or not case.lines:
        assert status == 1 and "no valid example" in out
        return
    assert status == 0, out
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    bad = {n for n, (_, kind, _) in enumerate(case.lines, 1) if kind == "bad"}
    assert report["accuracy"]["rejected"] == len(bad)
    assert report["accuracy"]["valid"] == len(case.lines) - len(bad)
    named = {int(m.group(1)) for p in report["accuracy"]["problems"] for m in [re.match(r".*?:(\d+)", p)] if m}
    assert named == flagged


@pytest.mark.parametrize("data, words", [
    (b"", "the file is empty"),
    (b"\n", None), (b"\n\n  \n\t\n", None), (b"\r\n\r\n", None), (BOM, None), (BOM + b"\n", None)])
def test_an_empty_or_blank_only_file_is_named(tmp_path, data, words):
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    result = read_file(path)
    assert not result.examples
    if words:
        assert words in str(e.value)
    else:  # every line named, blank lines counted
        assert sorted(result.rejected) == list(range(1, data.count(b"\n") + (not data.endswith(b"\n")) + 1))


# Each fix the fuzzing above led to, as its minimal case: (line 2 of a file, words its problem must hold,
# words it must not).
GOOD = b'{"instruction": "q", "output": "a"}'
MESSAGES = [
    # a line cut inside a string: json's "Unterminated string starting at" said no more than that
    (b'{"instruction": "q", "output": "unfinish', ("Unterminated string starting at column 32", "cut short"), ()),
    # cut inside a character: UTF-8 all the same, not a legacy encoding to re-encode from
    ('{"instruction": "q", "output": "caf\u00e9 \u4e2d'.encode()[:-1], ("ends inside a UTF-8 character",),
     ("iconv", "CP1252")),
    # ... and the rest of it on the next line, starting inside that character
    ('\u6587", "output": "a"}'.encode()[1:], ("starts inside a UTF-8 character",), ("iconv",)),
    # one stray byte in UTF-8 text: re-encoding the file from CP1252 would garble every é in it
    ('{"instruction": "caf\u00e9 \u4e2d", "output": "na\u00efve'.encode() + b"\xff" + b'"}',
     ("the rest of the line is UTF-8", "stray byte"), ("iconv", "CP1252")),
    (b'{"instruction": "q\x00", "output": "a"}', ("Invalid control character at column 19", "U+0000", "\\u0000"),
     ()),
    (b'{"instruction": "q",\x00 "output": "a"}', ("invisible character, U+0000",), ()),
    (b'{\xef\xbb\xbf"instruction": "q", "output": "a"}', ("invisible character, U+FEFF",), ()),
    (b'{"instruction": "q", "output": "a", "tags": ["x",]}', ("trailing comma before ']'",), ()),
    (b'{"instruction": "q", "output": true}', ('write it as a string: "true"',), ("True",)),
    (b'{"messages": [{"role": "User", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     ("roles are lower case: 'user'",), ()),
    (b'{"conversations": [{"from": "human", "value": "q"}, {"from": "GPT", "value": "a"}]}',
     ("roles are lower case: 'gpt'",), ()),
]


@pytest.mark.parametrize("line, words, wrong", MESSAGES, ids=[
    "unterminated-string", "cut-in-a-character", "starts-in-a-character", "stray-byte-in-utf8", "raw-nul-in-string",
    "nul-between-tokens", "bom-between-tokens", "trailing-comma-in-array", "boolean-hint", "upper-case-role",
    "upper-case-sharegpt-role"])
def test_each_corruption_is_named_for_what_it_is(tmp_path, line, words, wrong):
    path = tmp_path / "x.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD + b"\r\n")
    # (a turn format beside instruction lines is also named as another format: not this test's concern)
    (problem,) = [p for p in read_file(path).problems if p.kind != "format"]
    assert problem.line == 2 and all(w in problem.message for w in words), problem.message
    assert not any(w in problem.message for w in wrong), problem.message


def test_a_10_mb_line_loads_and_a_damaged_one_is_named(tmp_path):
    text = "word \u00e9 " * 1_250_000
    line = dumps({"instruction": "q", "output": text})
    assert len(line) > 10_000_000
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join([GOOD, line, GOOD]) + b"\n")
    (example,) = [e for e in load_jsonl(path) if e.line == 2]
    assert example.response == text
    for damaged, words in [(line[:-2], "cut short"), (line[:-9] + b"\xff" + line[-9:], "stray byte")]:
        path.write_bytes(b"\n".join([GOOD, damaged, GOOD]) + b"\n")
        (problem,) = read_file(path).problems
        assert problem.line == 2 and words in problem.message


def test_line_numbers_stay_right_after_a_bom_crlf_and_blank_lines(tmp_path, capsys):
    """Line 1 has a BOM, every line ends in CRLF, lines 2 and 4 are blank: the duplicate of line 3 on
    line 7 and the bad line 6 keep their numbers everywhere a line is named."""
    rec = lambda q: dumps({"instruction": q, "output": "a"})
    lines = [BOM + rec("first question here"), b"", rec("the same question"), b"  ", rec("another one"),
             b'{"instruction": "q", "output": 1}', rec("the same question")]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(x + b"\r\n" for x in lines))
    result = read_file(path)
    assert [e.line for e in result.examples] == [1, 3, 5, 7]
    assert [(p.line, p.kind) for p in result.problems] == [(1, "encoding"), (2, "blank"), (4, "blank"), (6, "field")]
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert [line.split(": ")[0] for line in str(e.value).splitlines()[1:]] == [f"  {path}:{n}" for n in (1, 2, 4, 6)]
    assert main(["data", "check", str(path), "--drop-invalid", "--output", str(tmp_path / "c.jsonl")]) == 1
    out = capsys.readouterr().out
    assert re.findall(rf"^{re.escape(str(path))}:(\d+)", out, re.M) == ["1", "2", "4", "6"]
    rejects = (tmp_path / "c.rejects.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["line"] for x in rejects] == [2, 4, 6]
    assert main(["data", "report", str(path), "--output", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert report["duplicates"]["exact"] == [[3, 7]]
    assert [int(p.split(":")[1]) for p in report["accuracy"]["problems"]] == [1, 2, 4, 6]
    assert report["representativeness"]["lengths"]["longest_lines"][0] == 1

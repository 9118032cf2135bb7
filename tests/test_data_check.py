"""`minipeft data check` (minipeft/data/check.py, jsonl.py, cli.py): every malformed line is
reported with its line and field, --drop-invalid loses no line, lengths are measured on the
rendered example, and the command line answers with an exit status and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipeft.data import read_file
from minipeft.data.check import check_file, write_clean
from minipeft.data.cli import main
from minipeft.data.jsonl import write_atomic

GOOD = '{"instruction": "Say hi", "output": "hi"}'
# (line, field the problem must name, words its message must contain)
MALFORMED = [
    ('{"instruction": "a" "output": "b"}', None, "invalid JSON: Expecting ',' delimiter"),
    ("{'instruction': 'a', 'output': 'b'}", None, "double quotes"),
    ('{"instruction": "a", "output": "b",}', None, "trailing comma"),
    ('{"instruction": "a",', None, "pretty-printed JSON"),
    ('{"instruction": "a", "output": NaN}', None, "NaN is not JSON"),
    ('{"instruction": "a", "output": "b", "output": "c"}', None, "'output' given twice"),
    ('["instruction", "output"]', None, "expected a JSON object {...}, got array"),
    ('{"instruction": "a"}', "output", "missing; expected a non-empty string"),
    ('{"instruction": "a", "ouput": "b"}', "output", "found 'ouput': a typo for 'output'?"),
    ('{"instruction": "  ", "output": "b"}', "instruction", "empty; expected a non-empty string"),
    ('{"instruction": "a", "output": 1}', "output", 'expected a string, got number (write it as a string: "1")'),
    ('{"instruction": "a", "output": null}', "output", "null; expected a non-empty string"),
    ('{"instruction": "a", "output": "b", "input": ["x"]}', "input", "expected a string, got array"),
    ('{"instruction": "a", "output": "b", "history": [["q"]]}', "history[0]", "pair of strings, got array of 1"),
    ('{"instruction": "a", "output": "b", "history": [["q", ""]]}', "history[0][1]", "empty assistant turn"),
    ('{"instruction": "a", "output": "b", "messages": []}', None, "has both 'instruction' and 'messages'"),
    ('{"prompt": "a", "completion": "b"}', None, "unknown format (keys: 'prompt', 'completion')"),
    # Keys in capitals are typos too, whichever side of the comparison they are on.
    ('{"instruction": "a", "OUTPUT": "b"}', "output", "found 'OUTPUT': a typo for 'output'?"),
    ('{"INSTRUCTION": "a", "OUTPUT": "b"}', None, "found 'INSTRUCTION': a typo for 'instruction'?"),
    # Deeper than Python's recursion limit: json.loads raises RecursionError, not a ValueError.
    ('{"instruction": "a", "output": "b", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", None,
     "nested too deeply"),
]
TURNS = [  # conversations, each malformed one way
    ([["user", "q"], ["bot", "a"]], "conversations[1].role", "'bot' is not a known role; expected one of 'system'"),
    ([["user", "q"], ["user", "q2"], ["assistant", "a"]], "conversations[1].role", "'user' comes after 'user'"),
    ([["assistant", "a"]], "conversations[0].role", "'assistant' starts the conversation; expected 'user'"),
    ([["user", "q"]], "conversations", "ends with 'user'; the last turn must be the assistant's reply"),
    ([["user", "q"], ["assistant", " "]], "conversations[1].content", "empty assistant turn"),
    ([["user", "q"], ["assistant", "a"], ["system", "s"], ["user", "q"], ["assistant", "a"]],
     "conversations[2].role", "'system' is only allowed as the first turn"),
    ([], "conversations", "empty array; expected at least a user turn and an assistant turn"),
]
MALFORMED += [(json.dumps({"conversations": [{"role": r, "content": c} for r, c in t]}), f, m) for t, f, m in TURNS]
MALFORMED += [
    ('{"conversations": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", '
     '"content": "a"}]}', "conversations[0].content", "got array; join the text parts into one string"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}', "conversations[1].from",
     "expected one of 'human', 'gpt', 'system'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}', "messages[1].role",
     "expected 'assistant'"),
]


class CharTokenizer:
    """One id per character, so rendered lengths can be counted by hand below."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [3 + ord(c) % 997 for c in text] + [2] * eos


def plain_length(user: str, assistant: str) -> int:
    """The plain template written out by hand: <s> "User: {u}\\nAssistant:" "{a}" </s>."""
    return 1 + len(f"User: {user}\nAssistant:") + len(assistant) + 1


def write_bytes(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines))
    return path


def line_count(data: bytes) -> int:
    return data.count(b"\n") + (not data.endswith(b"\n"))


@pytest.mark.parametrize("line, field, words", MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_each_malformed_line_is_named_with_its_field(tmp_path, line, field, words):
    path = write_bytes(tmp_path, [GOOD, line, GOOD])
    result = check_file(path)
    assert sorted(result.rejected) == [2] and [e.line for e in result.examples] == [1, 3]
    problems = result.rejected[2]
    assert any(p.field == field and words in p.message for p in problems), [str(p) for p in problems]
    assert all(str(p).startswith(f"{path}:2") for p in problems)


def test_invalid_json_names_the_column(tmp_path):
    (p,) = check_file(write_bytes(tmp_path, ['{"instruction": "a" "output": "b"}'])).problems
    assert p.column == 21 and str(p).startswith(f"{tmp_path / 'data.jsonl'}:1:21: invalid JSON")


def test_encoding_problems_give_the_byte_offset_in_the_file(tmp_path):
    bad = '{"instruction": "caf'.encode() + b"\xe9" + b'", "output": "b"}'  # Latin-1 é, not UTF-8
    path = write_bytes(tmp_path, [GOOD, b"\xef\xbb\xbf" + GOOD.encode(), bad])
    data = path.read_bytes()
    bom_at, latin_at = data.index(b"\xef\xbb\xbf"), data.index(b"\xe9")
    result = check_file(path)
    bom, latin = result.problems
    assert (bom.line, bom.keep) == (2, True) and f"byte offset {bom_at}" in bom.message
    assert latin.line == 3 and f"byte 0xe9 at byte offset {latin_at}" in latin.message
    assert sorted(result.rejected) == [3]  # the BOM line is kept (stripped in the clean copy)


WIDE_LINE = '{"instruction": "caf\u00e9", "output": "b"}'.encode("utf-16-le")  # a PowerShell-written record
NOT_UTF8 = [  # (bytes of line 2, fragments its message must hold, encodings it must not suggest)
    ('{"instruction": "caf\u00e9", "output": "b"}'.encode("latin-1"),
     ("it reads as CP1252 (Windows Latin-1) '", '"caf\u00e9"', "; re-encode the file: iconv -f CP1252 -t UTF-8"),
     ("GB18030", "CP932")),
    ('{"instruction": "\u4f60\u597d", "output": "b"}'.encode("gbk"),
     ("it reads as GB18030 (GBK) '", '"\u4f60\u597d"', "CP932 (Shift-JIS) '",
      "re-encode the file from the one that reads right: iconv -f ENCODING -t UTF-8"), ()),
    (b"\xff\xfe" + WIDE_LINE, ("starts with a UTF-16LE byte-order mark: re-encode it (iconv -f UTF-16 -t UTF-8",),
     ("GB18030", "CP932", "CP1252")),
    (WIDE_LINE, ("holds NUL bytes, as UTF-16 and UTF-32 text does",), ("GB18030", "CP932", "CP1252")),
    (b'{"instruction": "a\x81", "output": "b"}', ("unknown encoding (not GB18030, CP932 or CP1252 either)",), ()),
]


@pytest.mark.parametrize("line, words, wrong", NOT_UTF8, ids=["latin-1", "gbk", "utf-16-bom", "utf-16", "unknown"])
def test_a_line_that_is_not_utf8_gets_only_an_encoding_that_reads_it(tmp_path, line, words, wrong):
    (problem,) = check_file(write_bytes(tmp_path, [GOOD, line])).problems
    assert problem.line == 2 and problem.message.startswith("not UTF-8: byte 0x")
    assert all(w in problem.message for w in words), problem.message
    assert not any(name in problem.message for name in wrong + ("GBK -t",)), problem.message


def test_blank_lines_and_an_empty_file(tmp_path):
    result = check_file(write_bytes(tmp_path, [GOOD, "", "   ", GOOD]))
    assert sorted(result.rejected) == [2, 3] and all("blank line" in p.message for p in result.problems)
    (empty,) = check_file(write_bytes(tmp_path, [], name="empty.jsonl")).problems
    assert empty.line is None and "empty" in empty.message


def test_drop_invalid_keeps_every_line_somewhere(tmp_path):
    lines = [GOOD, "", *(m[0] for m in MALFORMED), b"\xef\xbb\xbf" + GOOD.encode(), b'{"output": "\xff"}',
             '{"instruction": "\u4f60\u597d", "output": "ok"}\r']
    path = write_bytes(tmp_path, lines)
    data = path.read_bytes() + b"{truncated"  # and a last line without "\n"
    path.write_bytes(data)
    result = check_file(path)
    clean, rejects = tmp_path / "clean.jsonl", tmp_path / "clean.rejects.jsonl"
    valid, rejected = write_clean(result, clean, rejects)
    kept = clean.read_bytes().splitlines(keepends=True)
    thrown = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert valid + rejected == line_count(data) == len(lines) + 1
    assert (len(kept), len(thrown)) == (valid, rejected) == (3, len(lines) + 1 - 3)
    # Valid lines verbatim (the BOM dropped, the "\r" kept); rejected ones with their reasons.
    assert kept == [GOOD.encode() + b"\n", GOOD.encode() + b"\n", lines[-1].encode() + b"\n"]
    originals = data.split(b"\n")
    for r in thrown:
        assert r["reasons"] and r["file"] == str(path)
        assert r["text"].encode("utf-8", "surrogateescape") == originals[r["line"] - 1]  # lossless, even for \xff
    assert sorted(r["line"] for r in thrown) == sorted(result.rejected)


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")

    def chunks():
        yield b"new\n"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"old\n" and os.listdir(tmp_path) == ["out.jsonl"]


def test_length_is_the_rendered_length_and_training_drops_what_the_check_rejects(tmp_path, capsys):
    from minipeft.job import render_all
    from minipeft.templates import get_template
    from minipeft.train_config import TrainConfig

    long_reply = "x" * 30
    path = write_bytes(tmp_path, [GOOD, json.dumps({"instruction": "Say hi", "output": long_reply})])
    n = plain_length("Say hi", long_reply)
    tok = CharTokenizer()
    assert not check_file(path, tok, max_length=n).problems  # exactly max_length fits
    (dropped,) = check_file(path, tok, max_length=n - 1).problems
    assert (dropped.line, dropped.keep) == (2, False) and f"{n} tokens > max_length {n - 1}: dropped" in dropped.message
    # The check describes training: what it rejects for length is what training leaves out.
    result = check_file(path, tok, max_length=n - 1)
    rendered = render_all(read_file(path).examples, tok, get_template("plain"), TrainConfig(max_length=n - 1), "t")
    assert [e.line for e in result.examples] == [1] and len(rendered) == 1
    with pytest.raises(SystemExit) as info:  # no --length-policy truncate: training cannot truncate
        main(["data", "check", str(path), "--length-policy", "truncate"])
    assert info.value.code == 2 and "unrecognized arguments: --length-policy" in capsys.readouterr().err


def test_an_unpaired_surrogate_is_rejected_with_its_field(tmp_path, capsys):
    # What an exporter that slices UTF-16 strings writes: json.loads accepts the lone escape.
    lone = r'{"instruction": "smile \ud83d", "output": "ok"}'
    pair = r'{"instruction": "smile \ud83d\ude00", "output": "ok"}'  # a whole character: fine
    nested = r'{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\udc00"}]}'
    path = write_bytes(tmp_path, [lone, pair, GOOD, nested])
    result = check_file(path)
    assert sorted(result.rejected) == [1, 4] and [e.line for e in result.examples] == [2, 3]
    assert [(p.line, p.field) for p in result.problems] == [(1, "instruction"), (4, "conversations[1].content")]
    assert "unpaired surrogate \\ud83d at character 6" in result.problems[0].message
    # The report and the clean copy, which used to fail encoding it, work on the valid lines.
    assert main(["data", "report", str(path), "--output", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text(encoding="utf-8"))["accuracy"]["rejected"] == 2
    assert main(["data", "check", str(path), "--drop-invalid", "--output", str(tmp_path / "c.jsonl")]) == 1
    assert (tmp_path / "c.jsonl").read_text().splitlines() == [pair, GOOD]
    assert f"{path}:1: instruction: unpaired surrogate" in capsys.readouterr().out


def test_an_unpaired_surrogate_never_reaches_sentencepiece(tmp_path, capsys):
    from minipeft.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Say hi to the weather today\nhello there, how are you\n" * 20, encoding="utf-8")
    train_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    path = write_bytes(tmp_path, [r'{"instruction": "smile \ud83d", "output": "ok"}', GOOD])
    args = ["--tokenizer", str(tmp_path / "tok")]
    assert main(["data", "check", str(path), "--max-length", "64", *args]) == 1  # no RuntimeError
    assert main(["data", "report", str(path), "--output", str(tmp_path / "rep"), *args]) == 0
    assert f"{path}:1: instruction: unpaired surrogate" in capsys.readouterr().out


@pytest.mark.parametrize("codec, bom, source", [
    ("utf-16-le", b"\xff\xfe", "UTF-16"), ("utf-16-be", b"\xfe\xff", "UTF-16"), ("utf-16-le", b"", "UTF-16LE"),
    ("utf-16-be", b"", "UTF-16BE"), ("utf-32-le", b"\xff\xfe\0\0", "UTF-32"), ("utf-32-be", b"", "UTF-32BE")])
def test_a_utf16_or_utf32_file_is_named_once_with_the_fix(tmp_path, capsys, codec, bom, source):
    # What PowerShell 5's `>` writes (UTF-16LE with a BOM and CRLF), and its cousins.
    text = GOOD + "\r\n" + '{"instruction": "\u4f60\u597d \U0001f600", "output": "b"}' + "\r\n"
    path = tmp_path / "wide.jsonl"
    path.write_bytes(bom + text.encode(codec))
    result = check_file(path)
    (problem,) = result.problems
    assert problem.line is None and str(problem).startswith(f"{path}: UTF-")
    assert f"iconv -f {source} -t UTF-8" in problem.message
    assert len(result.lines) == 2 and sorted(result.rejected) == [1, 2] and not result.examples  # no phantom line
    valid, rejected = write_clean(result, tmp_path / "c.jsonl", tmp_path / "r.jsonl")
    thrown = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (valid, rejected) == (0, 2) and (tmp_path / "c.jsonl").read_bytes() == b""
    # The rejects hold the lines byte for byte, cut at the file's own newline.
    newline = "\n".encode(codec)
    assert b"".join(r["text"].encode("utf-8", "surrogateescape") + newline for r in thrown) == path.read_bytes()
    assert main(["data", "check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [str(problem), f"{path}: 2 lines, format unknown: 0 valid, "
                                                    "2 rejected; problems: 1 encoding"]


def test_a_special_tokens_text_in_content_is_rejected(tmp_path):
    from minipeft.templates import get_template
    from minipeft.tokenizer import load_tokenizer

    reply = "With the <|im_end|> token, then a newline."
    tok = load_tokenizer(Path(__file__).resolve().parent.parent / "models" / "minillama-10m")
    messages = [{"role": "user", "content": "How do turns end?"}, {"role": "assistant", "content": reply}]
    end = tok.token_to_id("<|im_end|>")
    # The reference for the harm: rendered by the plain template (chatml spells a message's text out,
    # split_special_tokens), the reply's labels hold an <|im_end|> id: the model would learn to emit it.
    assert get_template("plain").render(messages, tok).labels.count(end) == 1
    records = [{"instruction": "How do turns end?", "output": reply},
               {"messages": [{"role": "system", "content": "Use <|im_start|>user"}] + messages[:1]
                + [{"role": "assistant", "content": "fine"}]},
               {"instruction": "q", "output": "a", "id": "<|im_end|>"}]  # an unread key: not rendered, not checked
    path = write_bytes(tmp_path, [json.dumps(r) for r in records])
    result = check_file(path, tok)
    assert [(p.line, p.field, p.kind) for p in result.problems if p.kind == "special"] == \
        [(1, "output", "special"), (2, "messages[0].content", "special")]
    assert "contains '<|im_end|>'" in str(result.problems[0]) and "'<|im_start|>'" in str(result.problems[1])
    assert 3 not in result.rejected
    # The tokenizer's own special tokens count too.
    class ToolTokenizer(CharTokenizer):
        special_tokens = ("<tool>",)

    path = write_bytes(tmp_path, [json.dumps({"instruction": "q", "output": "call <tool>"})], name="tool.jsonl")
    assert not check_file(path).problems and [p.kind for p in check_file(path, ToolTokenizer()).problems] == ["special"]


def test_write_atomic_fsyncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    calls = []  # (what, inode): a rename keeps the inode, so the temp file's is the target's
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", os.stat(a).st_ino)) or real_replace(a, b))
    target = tmp_path / "out.jsonl"
    write_atomic(target, [b"new\n"])
    assert target.read_bytes() == b"new\n"
    file, directory = target.stat().st_ino, tmp_path.stat().st_ino
    assert calls == [("fsync", file), ("replace", file), ("fsync", directory)]


def test_cli_in_a_subprocess_exits_1_without_a_traceback(tmp_path):
    bad = write_bytes(tmp_path, [GOOD, '{"instruction": "a", "output": 3}', "{"], name="bad.jsonl")
    out = subprocess.run([sys.executable, "-c", "import sys; from minipeft.data.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", "data", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    assert f"{bad}:2: output: expected a string, got number" in out.stdout and f"{bad}:3:2: invalid JSON" in out.stdout
    assert "3 lines, format instruction: 1 valid, 2 rejected" in out.stdout


def test_cli_exit_0_for_a_clean_file_and_2_for_a_missing_one(tmp_path, capsys):
    assert main(["data", "check", str(write_bytes(tmp_path, [GOOD]))]) == 0
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: cannot read: No such file" in err and "Traceback" not in err


@pytest.mark.parametrize("args, words", [
    (["--output", "x.jsonl"], "--drop-invalid, --output"),
    (["--drop-invalid"], "--drop-invalid, --output"),
    (["--max-length", "8"], "--max-length counts tokens with --tokenizer"),
    (["--tokenizer", "tok"], "--max-length counts tokens with --tokenizer"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, args, words):
    path = write_bytes(tmp_path, [GOOD])
    assert main(["data", "check", str(path), *args]) == 2
    assert words in capsys.readouterr().err


def test_cli_drop_invalid_writes_clean_and_rejects(tmp_path, capsys):
    path = write_bytes(tmp_path, [GOOD, "", '{"instruction": "a"}', GOOD])
    assert main(["data", "check", str(path), "--drop-invalid", "--output", str(tmp_path / "c.jsonl")]) == 1
    assert (tmp_path / "c.jsonl").read_text() == GOOD + "\n" + GOOD + "\n"
    rejects = [json.loads(x) for x in (tmp_path / "c.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reasons"][0].split(";")[0]) for r in rejects] == [(2, "blank line"), (3, "output: missing")]
    assert "wrote 2 valid line(s)" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--output", "--rejects"])
def test_cli_drop_invalid_refuses_to_overwrite_its_input(tmp_path, capsys, flag):
    path = write_bytes(tmp_path, [GOOD, "{"])
    before = path.read_bytes()
    # Another spelling of the same file: the check compares files, not strings.
    same = os.path.join(tmp_path, ".", path.name)
    args = ["--output", same] if flag == "--output" else ["--output", str(tmp_path / "c.jsonl"), "--rejects", same]
    assert main(["data", "check", str(path), "--drop-invalid", *args]) == 2
    out, err = capsys.readouterr()
    assert f"{same} would overwrite the input file; choose another {flag}" in err
    assert "invalid JSON" not in out + err  # refused before the check: line 2's problem is not reported
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_cli_with_a_real_tokenizer_measures_what_the_template_renders(tmp_path, capsys):
    from minipeft.templates import get_template
    from minipeft.tokenizer import load_tokenizer, train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Say hi to the weather today\nhello there, how are you\n" * 20, encoding="utf-8")
    train_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    reply = "hello there, how are you " * 4
    path = write_bytes(tmp_path, [GOOD, json.dumps({"instruction": "Say hi", "output": reply})])
    tok = load_tokenizer(tmp_path / "tok")
    n = len(get_template("chatml").render([{"role": "user", "content": "Say hi"},
                                           {"role": "assistant", "content": reply}], tok).input_ids)
    args = ["data", "check", str(path), "--tokenizer", str(tmp_path / "tok"), "--template", "chatml"]
    assert main(args + ["--max-length", str(n)]) == 0
    assert main(args + ["--max-length", str(n - 1)]) == 1
    assert f"{path}:2: {n} tokens > max_length {n - 1}: dropped" in capsys.readouterr().out

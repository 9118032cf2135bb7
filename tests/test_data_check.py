"""`minipeft data check` (minipeft/data/check.py, jsonl.py, cli.py): every malformed line is
reported with its line and field, --drop-invalid loses no line, lengths are measured on the
rendered example, and the command line answers with an exit status and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def test_length_is_the_rendered_length_and_the_policy_decides(tmp_path):
    long_reply = "x" * 30
    path = write_bytes(tmp_path, [GOOD, json.dumps({"instruction": "Say hi", "output": long_reply})])
    n = plain_length("Say hi", long_reply)
    tok = CharTokenizer()
    assert not check_file(path, tok, max_length=n).problems  # exactly max_length fits
    (dropped,) = check_file(path, tok, max_length=n - 1).problems
    assert (dropped.line, dropped.keep) == (2, False) and f"{n} tokens > max_length {n - 1}: dropped" in dropped.message
    (cut,) = check_file(path, tok, max_length=n - 1, length_policy="truncate").problems
    assert cut.keep and "losing the last 1" in cut.message
    # A prompt that alone fills max_length leaves nothing to learn: dropped even when truncating;
    # one token more and the first reply token survives.
    prompt = plain_length("Say hi", "") - 1  # <s> + "User: ...Assistant:", without </s>
    (gone,) = check_file(path, tok, max_length=prompt, length_policy="truncate").rejected[2]
    assert "no reply token" in gone.message
    assert 2 not in check_file(path, tok, max_length=prompt + 1, length_policy="truncate").rejected


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

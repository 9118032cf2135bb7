"""Data formats (minipeft/data/formats.py, loader.py): every spelling normalizes to the same
messages, the instruction join rule, mixed-format files, and load_jsonl's errors.

The reference for "normalized correctly" is the conversation written out by hand once, and the
chat template (minipeft/templates.py) that consumes it: what it renders must not depend on the
spelling the file used.
"""
from __future__ import annotations

import json

import pytest

from minipeft.data import DataError, load_jsonl, read_file
from minipeft.data.formats import INSTRUCTION_JOIN
from minipeft.templates import get_template

SYSTEM, Q1, A1 = "Be brief.", "你好", "你好！有什么可以帮助你的？"
Q2, A2 = "Translate: 今天天气很好", "The weather is nice today"
EXPECTED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]

SPELLINGS = {
    "instruction": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "output": A2},
    "conversations": {"conversations": EXPECTED},
    "messages": {"messages": EXPECTED},
    "sharegpt": {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                    "value": m["content"]} for m in EXPECTED]},
}


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


class CharTokenizer:
    """One id per character: enough for a template to render, independent of minipeft.tokenizer."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [3 + ord(c) % 997 for c in text] + [2] * eos


@pytest.mark.parametrize("fmt", sorted(SPELLINGS))
def test_every_spelling_normalizes_to_the_same_messages(tmp_path, fmt):
    path = write(tmp_path, [SPELLINGS[fmt]] * 2)
    examples = load_jsonl(path)
    assert [e.line for e in examples] == [1, 2]
    e = examples[0]
    assert (e.format, e.source, e.raw) == (fmt, str(path), SPELLINGS[fmt])
    assert e.messages == EXPECTED
    assert e.response == A2 and e.prompt.splitlines()[0] == f"system: {SYSTEM}"
    # What the chat template renders is then the same for every spelling.
    reference = get_template("plain").render(EXPECTED, CharTokenizer())
    assert get_template("plain").render(e.messages, CharTokenizer()) == reference


def test_the_outline_examples_parse(tmp_path):
    record = {"instruction": "将以下文本翻译成英文", "input": "今天天气很好", "output": "The weather is nice today"}
    (e,) = load_jsonl(write(tmp_path, [record]))
    assert e.messages == [{"role": "user", "content": record["instruction"] + INSTRUCTION_JOIN + record["input"]},
                          {"role": "assistant", "content": "The weather is nice today"}]
    assert INSTRUCTION_JOIN == "\n\n"  # the documented Alpaca rule


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  \n"}, {"input": None}, {"system": ""},
                                   {"system": None}, {"history": None}, {"history": []}, {"id": 7}])
def test_absent_empty_or_null_optional_fields_add_nothing(tmp_path, extra):
    (e,) = load_jsonl(write(tmp_path, [{"instruction": "Say hi", "output": "hi", **extra}]))
    assert e.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_an_empty_system_turn_means_no_system_prompt_in_every_format(tmp_path):
    turns = [{"role": "system", "content": " "}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    (e,) = load_jsonl(write(tmp_path, [{"messages": turns}]))
    assert e.messages == turns[1:]


def test_windows_line_endings_parse_and_keep_their_line_numbers(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\r\n{"instruction": "c", "output": "d"}\r\n')
    assert [(e.line, e.response) for e in load_jsonl(path)] == [(1, "b"), (2, "d")]


def test_cr_only_line_endings_are_named_for_the_whole_file(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\r{"instruction": "c", "output": "d"}\r')
    result = read_file(path)
    (problem,) = result.problems  # not "Extra data (two JSON values on one line?)"
    assert str(problem).startswith(f"{path}: line endings are CR only (classic Mac): convert to LF or CRLF")
    assert sorted(result.rejected) == [1] and not result.examples
    # One record ending in a CR has no CR between records: it reads.
    path.write_bytes(b'{"instruction": "a", "output": "b"}\r')
    assert [e.response for e in load_jsonl(path)] == ["b"]


def test_a_cr_alone_inside_an_lf_file_is_named_as_a_line_ending(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\r{"instruction": "c", "output": "d"}\n'
                     b'{"instruction": "e", "output": "f"} {"instruction": "g", "output": "h"}\n')
    first, second = read_file(path).problems
    assert first.line == 1 and "a CR alone ends a line here: the file mixes line endings" in str(first)
    assert second.line == 2 and "two JSON values on one line?" in str(second)  # a space is not a line end


def test_a_file_mixing_formats_names_the_lines_of_each(tmp_path):
    rows = [SPELLINGS["instruction"], SPELLINGS["instruction"], SPELLINGS["messages"], SPELLINGS["instruction"],
            SPELLINGS["sharegpt"], SPELLINGS["instruction"]]
    result = read_file(write(tmp_path, rows))
    assert result.format == "instruction"
    assert sorted(result.rejected) == [3, 5]
    assert "format 'messages', but this file is 'instruction'" in result.rejected[3][0].message
    assert "format 'sharegpt'" in result.rejected[5][0].message
    (whole,) = [p for p in result.problems if p.line is None]
    assert "instruction on lines 1-2, 4, 6; messages on lines 3; sharegpt on lines 5" in whole.message
    assert [e.line for e in result.examples] == [1, 2, 4, 6]



def test_a_conversation_that_shows_no_spelling_does_not_mix_formats(tmp_path):
    # An empty array, or turns that are not objects, could be ShareGPT or role/content: such a
    # line is wrong for what it holds, not for a format it does not show.
    rows = [SPELLINGS["sharegpt"], {"conversations": []}, SPELLINGS["sharegpt"], {"conversations": ["hi", "yo"]}]
    result = read_file(write(tmp_path, rows))
    assert result.format == "sharegpt"
    assert [(p.line, p.field) for p in result.problems] == [(2, "conversations"), (4, "conversations[0]"),
                                                            (4, "conversations[1]")], [str(p) for p in result.problems]
    assert "empty array" in result.problems[0].message


def test_role_and_value_is_a_role_content_turn_missing_its_content(tmp_path):
    # The role key tells the spelling: a "value" typo in a role/content file is not a ShareGPT line
    # (which would be answered with "from: missing" and "mixes formats").
    rows = [SPELLINGS["conversations"], {"conversations": [{"role": "user", "value": Q1}, EXPECTED[2]]}]
    result = read_file(write(tmp_path, rows))
    assert result.format == "conversations"
    (problem,) = result.problems
    assert (problem.line, problem.field) == (2, "conversations[0].content"), str(problem)
    assert [e.format for e in load_jsonl(write(tmp_path, [SPELLINGS["sharegpt"]]))] == ["sharegpt"]

def test_load_jsonl_raises_a_data_error_listing_every_problem(tmp_path):
    path = write(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a"},
                            {"instruction": "", "output": "b"}])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    text = str(info.value)
    assert f"{path}:2: output: missing" in text and f"{path}:3: instruction: empty" in text
    assert [(p.line, p.field) for p in info.value.problems] == [(2, "output"), (3, "instruction")]


def test_load_jsonl_is_strict_about_a_bom_that_the_check_would_only_strip(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DataError, match="byte-order mark"):
        load_jsonl(path)
    assert [e.response for e in read_file(path).examples] == ["b"]  # the check keeps the line


@pytest.mark.parametrize("fmt", ["conversations", "messages", "sharegpt"])
def test_a_top_level_system_is_the_first_turn_of_a_turn_format(tmp_path, fmt):
    key = "messages" if fmt == "messages" else "conversations"
    turns = SPELLINGS[fmt][key]
    # LLaMA-Factory's sharegpt keeps the system prompt beside the turns: it must not be dropped.
    (e,) = load_jsonl(write(tmp_path, [{key: turns[1:], "system": SYSTEM}]))
    assert e.messages == EXPECTED
    reference = get_template("plain").render(EXPECTED, CharTokenizer())
    assert get_template("plain").render(e.messages, CharTokenizer()) == reference
    (e,) = load_jsonl(write(tmp_path, [{key: turns[1:], "system": " "}]))  # empty: no system prompt
    assert e.messages == EXPECTED[1:]
    result = read_file(write(tmp_path, [{key: turns, "system": "Other."}, {key: turns[1:], "system": 3}]))
    assert [(p.line, p.field) for p in result.problems] == [(1, "system"), (2, "system")]
    assert f"given twice: as this field and as the system turn {key}[0]" in result.problems[0].message
    assert "expected a string, got number" in result.problems[1].message and not result.examples


def test_a_misspelled_optional_key_is_a_warning_naming_the_key(tmp_path):
    rows = [{"instruction": "hi", "output": "yo", "sytem": "Be nice."},
            {"instruction": "hi", "inptu": "there", "output": "yo"},
            {"instruction": "hi", "output": "yo", "id": 7, "category": "greeting"},
            {"instruction": "hi", "ouput": "yo"}]  # a required key: its error already says so, no second word
    path = write(tmp_path, rows)
    result = read_file(path)
    assert [(p.line, p.field, p.keep) for p in result.problems] == \
        [(1, "sytem", True), (2, "inptu", True), (4, "output", False)]
    assert str(result.problems[0]) == f"{path}:1: sytem: unknown key, ignored: a typo for 'system'?"
    assert "a typo for 'input'?" in result.problems[1].message
    assert [e.line for e in result.examples] == [1, 2, 3]  # a warning keeps the line
    with pytest.raises(DataError, match="sytem"):  # any error still rejects, and its message lists the warnings too
        load_jsonl(path)


def test_a_typo_warning_is_printed_and_the_file_still_loads(tmp_path, capsys):
    # Training, the platform and `data split` used to refuse a file for a mere warning.
    path = write(tmp_path, [{"instruction": f"q{i}", "output": "a"} for i in range(3)]
                 + [{"instruction": "q", "output": "a", "sytem": "Be nice."}])
    assert [e.line for e in load_jsonl(path)] == [1, 2, 3, 4]
    assert capsys.readouterr().err == f"warning: {path}:4: sytem: unknown key, ignored: a typo for 'system'?\n"


def test_a_warning_on_every_line_is_printed_once_with_its_count(tmp_path, capsys):
    path = write(tmp_path, [{"instruction": f"q{i}", "output": "a", "inputs": "x"} for i in range(500)])
    assert len(load_jsonl(path)) == 500
    assert capsys.readouterr().err == (f"warning: {path}:1: inputs: unknown key, ignored: a typo for 'input'? "
                                       "(and on 499 more lines)\n")


@pytest.mark.parametrize("key", ["conversation_id", "message_id", "system_id", "output_len", "instruction_type",
                                 "id", "category", "source", "prompt_id"])
def test_a_metadata_key_containing_a_known_one_is_no_typo(tmp_path, key, capsys):
    # At difflib's 0.75 cutoff each of these read as a typo ("conversation_id" of 'conversations').
    path = write(tmp_path, [{"instruction": f"q{i}", "output": "a", key: i} for i in range(3)])
    assert read_file(path).problems == [] and len(load_jsonl(path)) == 3 and capsys.readouterr().err == ""


@pytest.mark.parametrize("key, known", [("sytem", "system"), ("systme", "system"), ("inptu", "input"),
                                        ("outptu", "output"), ("inputs", "input"), ("histroy", "history"),
                                        ("mesages", "messages"), ("conversatons", "conversations"),
                                        ("instrution", "instruction"), ("instuctoin", "instruction"),
                                        ("SYSTEM", "system"), ("Output", "output")])  # keys are case-sensitive
def test_a_near_miss_of_a_whole_known_key_is_a_typo(tmp_path, key, known):
    (problem,) = read_file(write(tmp_path, [{"instruction": "q", "output": "a", key: "x"}])).problems
    assert (problem.field, problem.keep, problem.kind) == (key, True, "typo")
    assert problem.message == f"unknown key, ignored: a typo for {known!r}?"


@pytest.mark.parametrize("fmt, null", [("instruction", "messages"), ("instruction", "conversations"),
                                       ("messages", "instruction"), ("sharegpt", "messages")])
def test_a_null_key_of_another_format_counts_as_absent(tmp_path, fmt, null):
    # What a table exported with one column per key writes for the columns a row does not use.
    (e,) = load_jsonl(write(tmp_path, [{**SPELLINGS[fmt], null: None}]))
    assert (e.format, e.messages) == (fmt, EXPECTED)


def test_a_null_format_key_alone_is_named_as_null(tmp_path):
    (problem,) = read_file(write(tmp_path, [{"messages": None}])).problems
    assert (problem.field, problem.message) == ("messages", "expected an array of turns, got null")


@pytest.mark.parametrize("turn, field, message", [
    ({"rol": "user", "content": Q1}, "messages[0].role",
     "missing; expected one of 'system', 'user', 'assistant' (found 'rol': a typo for 'role'?)"),
    ({"role": "user", "contnet": Q1}, "messages[0].content",
     "expected a string, missing (found 'contnet': a typo for 'content'?)"),
    ({"Role": "user", "content": Q1}, "messages[0].role",
     "missing; expected one of 'system', 'user', 'assistant' (found 'Role': a typo for 'role'?)"),
])
def test_a_misspelled_turn_key_is_named_with_its_typo(tmp_path, turn, field, message):
    (problem,) = read_file(write(tmp_path, [{"messages": [turn, EXPECTED[2]]}])).problems
    assert (problem.field, problem.message) == (field, message)


def test_a_misspelled_sharegpt_turn_key_is_named_with_its_typo(tmp_path):
    turns = [{"form": "human", "value": Q1}, {"from": "gpt", "vaule": A1}]
    first, second = read_file(write(tmp_path, [{"conversations": turns}])).problems
    assert first.field == "conversations[0].from" and "(found 'form': a typo for 'from'?)" in first.message
    assert second.field == "conversations[1].value" and "(found 'vaule': a typo for 'value'?)" in second.message

"""The bundled datasets (minipeft/datasets.py, datasets/): regenerating them gives the committed bytes,
and each task holds the properties its README promises, checked with the project's own data tools
(load_jsonl, `minipeft data check|split`, report.leakage) and with rules restated here independently
(JSON key order and copied values, the label rule, telegram style on hand-written sentences)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from minipeft import cli
from minipeft.data import cli as data_cli
from minipeft.data import load_jsonl, read_file
from minipeft.data.dedup import NEAR_THRESHOLD, prompt_key
from minipeft.data.report import TASK_SIZES, leakage
from minipeft.data.split import RATIO_RANGE
from minipeft.datasets import (CITIES, FIRST_NAMES, LAST_NAMES, PHRASES, STYLE_SYSTEM, generate_tasks, read_tasks,
                               telegram)
from minipeft.evaluate import TASKS, detect_task

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
NAMES = ("json_extract", "sentiment", "style")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "datasets"
    assert cli.main(["datasets", "build", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tasks() -> dict:
    return read_tasks(DATASETS / "tasks.json")


@pytest.fixture(scope="module")
def splits(tasks: dict) -> dict:
    """Task name -> (train examples, test examples), loaded from the committed files."""
    return {name: (load_jsonl(entry["train"]), load_jsonl(entry["test"])) for name, entry in tasks.items()}


def _files(root: Path) -> list[Path]:
    """The files under root but README.md and the folders `minipeft data report FILE` writes beside FILE
    (FILE.report/, untracked): running the README's report command must not fail the byte comparison."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != "README.md"
                  and not any(part.endswith(".report") for part in p.relative_to(root).parts[:-1]))


def test_a_data_report_beside_the_files_is_not_a_dataset_file(tmp_path: Path):
    # `minipeft data report datasets/sentiment/train.jsonl` (datasets/README.md) writes
    # datasets/sentiment/train.report/; the byte comparison then failed on files the build never writes.
    (tmp_path / "sentiment").mkdir()
    lines = (DATASETS / "sentiment" / "train.jsonl").read_text().splitlines(keepends=True)[:5]
    (tmp_path / "sentiment" / "train.jsonl").write_text("".join(lines))
    assert data_cli.main(["data", "report", str(tmp_path / "sentiment" / "train.jsonl")]) == 0
    assert (tmp_path / "sentiment" / "train.report").is_dir()
    assert _files(tmp_path) == [Path("sentiment/train.jsonl")]


def test_build_gives_the_committed_bytes(built: Path):
    # The committed files were written by another process, with another str hash seed: equal
    # bytes prove the output depends on the seed alone, and that the committed files are current.
    assert _files(built) == _files(DATASETS)
    for rel in _files(built):
        assert (built / rel).read_bytes() == (DATASETS / rel).read_bytes(), f"{rel}: run `minipeft datasets build`"
    assert sum((DATASETS / rel).stat().st_size for rel in _files(DATASETS)) < 1_000_000


def test_the_seed_matters(splits: dict):
    # Without this, a generator that ignored its seed would pass the byte comparison above.
    assert generate_tasks(1)["style"][0] != [e.raw for e in splits["style"][0]]


def test_tasks_json_describes_the_files(tasks: dict, splits: dict):
    assert list(tasks) == list(NAMES)
    for name, entry in tasks.items():
        assert read_file(entry["train"]).format == read_file(entry["test"]).format == entry["format"]
        assert entry["task"] in TASKS and entry["metric"] in entry["metrics"]
        # minipeft eval detects the same task kind from the references, so both agree on the metrics.
        assert detect_task([e.response for e in splits[name][1]]) == entry["task"]
        assert entry["description"] and "\n" not in entry["description"]
    assert Path(tasks["json_extract"]["train"]) == DATASETS / "json_extract" / "train.jsonl"


def test_sizes_follow_the_outline(splits: dict):
    low, high = RATIO_RANGE  # the outline: hold out 10-20% for evaluation
    for name, (train, test) in splits.items():
        assert low <= len(test) / (len(train) + len(test)) <= high, name
    lo, hi = TASK_SIZES["classification"]  # simple classification: 100-500 examples
    assert lo <= len(splits["sentiment"][0]) <= hi
    lo, hi = TASK_SIZES["dialogue-style"]  # dialogue style: 500-2000
    assert lo <= len(splits["style"][0]) <= hi
    assert (len(splits["json_extract"][0]), len(splits["json_extract"][1])) == (600, 100)


def test_files_pass_the_data_check_and_are_short(tasks: dict, splits: dict, capsys: pytest.CaptureFixture):
    for entry in tasks.values():
        for path in (entry["train"], entry["test"]):
            assert data_cli.main(["data", "check", path]) == 0, capsys.readouterr().out
            assert Path(path).read_bytes().isascii()
    # A tiny model trains on <= 96 tokens: a 4k SentencePiece vocabulary trained on Python's docs
    # gave at most 89 tokens (plain template) for these examples, whose longest text is 193 characters.
    assert max(len(e.text) for train, test in splits.values() for e in train + test) <= 200


def test_no_prompt_leaks_between_splits(splits: dict):
    for name, (train, test) in splits.items():
        train_keys, test_keys = [prompt_key(e) for e in train], [prompt_key(e) for e in test]
        assert len(set(train_keys)) == len(train_keys) and len(set(test_keys)) == len(test_keys), name
        assert not set(train_keys) & set(test_keys), name
        assert leakage(train, test, NEAR_THRESHOLD)["leaked_test_examples"] == 0, name


def test_json_replies_are_strict_and_copied(splits: dict):
    train, test = splits["json_extract"]
    for e in train + test:
        sentence = e.raw["input"]
        person = json.loads(e.response)
        assert list(person) == ["name", "age", "city"]
        assert e.response == json.dumps(person)  # one formatting: json.dumps' default separators
        assert type(person["age"]) is int and re.findall(r"\d+", sentence) == [str(person["age"])]
        assert person["name"] in sentence and person["city"] in sentence
    names = [{json.loads(e.response)["name"] for e in part} for part in (train, test)]
    assert [len(n) for n in names] == [len(train), len(test)]  # one example per person
    assert not names[0] & names[1]  # test people are new ...
    for i in (0, 1):  # ... but made of first and last names that training shows
        assert {n.split()[i] for n in names[1]} <= {n.split()[i] for n in names[0]}


def test_no_name_or_city_word_begins_another():
    # A tiny model trained with "Berg" and "Bergen" in these lists wrote one for the other.
    words = {w for text in FIRST_NAMES + LAST_NAMES + CITIES for w in text.split()}
    assert not [(a, b) for a in words for b in words if a != b and b.startswith(a)]


def test_sentiment_labels_follow_the_words_and_are_balanced(splits: dict, tmp_path: Path):
    phrases = [(label, p) for label, group in PHRASES.items() for p in group]
    assert all(p not in q for _, p in phrases for _, q in phrases if p != q)  # so `in` finds each phrase once
    for part in splits["sentiment"]:
        for e in part:
            found = {label for label, p in phrases if p in e.prompt}
            assert found and not {"positive", "negative"} <= found, e.prompt
            expected = "positive" if "positive" in found else "negative" if "negative" in found else "neutral"
            assert e.response == expected, e.prompt
        counts = Counter(e.response for e in part)
        assert set(counts) == set(PHRASES) and len(set(counts.values())) == 1, counts
    train_path = DATASETS / "sentiment" / "train.jsonl"
    assert data_cli.main(["data", "split", str(train_path), "--stratify", "--output-dir", str(tmp_path)]) == 0
    assert Counter(e.response for e in load_jsonl(tmp_path / "test.jsonl")) == {label: 10 for label in PHRASES}


@pytest.mark.parametrize("text, expected", [
    ("The train arrives at noon. Meet me at the station.", "train arrives at noon STOP meet me at station STOP"),
    ("An apple a day keeps THE doctor away!", "apple day keeps doctor away STOP"),
    ("Theatre tickets are ready? Another one, then", "theatre tickets are ready STOP another one then STOP"),
    ("Don't wait for 2 days.", "don't wait for 2 days STOP"),
    ("", ""),
])
def test_telegram(text: str, expected: str):
    assert telegram(text) == expected


def test_style_replies_are_the_telegram_of_the_message(splits: dict):
    for part in splits["style"]:
        for e in part:
            system, user, assistant = (m["content"] for m in e.messages)
            assert system == STYLE_SYSTEM and assistant == telegram(user)
            assert assistant != user.lower()  # the rewrite always changes something visible


def test_read_tasks_names_what_is_wrong(tmp_path: Path):
    missing = tmp_path / "datasets" / "tasks.json"
    with pytest.raises(ValueError, match="tasks.json: cannot read"):
        read_tasks(missing)
    missing.parent.mkdir()
    missing.write_text(json.dumps({"style": {"train": "datasets/style/train.jsonl"}}))
    with pytest.raises(ValueError, match=r"style: expected an object with \"train\" and \"test\""):
        read_tasks(missing)

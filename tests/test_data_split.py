"""`minipeft data split` (minipeft/data/split.py): deterministic, seedable, stratified on demand,
and never a prompt on both sides; files written byte for byte."""
from __future__ import annotations

import json
import math
import random
from collections import Counter

from minipeft.data import read_file
from minipeft.data.cli import main
from minipeft.data.dedup import prompt_key
from minipeft.data.split import split_examples


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def rows(n=200, seed=0, labels=("pos", "neg", "neutral"), weights=(6, 3, 1)):
    rng = random.Random(seed)
    return [{"instruction": "Classify.", "input": f"review {i}: {rng.random():.6f}",
             "output": rng.choices(labels, weights)[0]} for i in range(n)]


def split(tmp_path, records, *args):
    path = write(tmp_path, records)
    out = tmp_path / "out"
    status = main(["data", "split", str(path), "--output-dir", str(out), *map(str, args)])
    lines = {name: (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if status == 0 else None
             for name in ("train", "test")}
    return status, lines["train"], lines["test"], path


def test_split_is_deterministic_complete_and_verbatim(tmp_path):
    status, train, test, path = split(tmp_path, rows(), "--test-ratio", "0.1", "--seed", "3")
    original = path.read_text(encoding="utf-8").splitlines()
    assert status == 0 and len(test) == 20 and len(train) == 180
    assert sorted(train + test) == sorted(original)
    assert train == [x for x in original if x in set(train)]  # file order kept
    assert split(tmp_path, rows(), "--test-ratio", "0.1", "--seed", "3")[1:3] == (train, test)
    assert split(tmp_path, rows(), "--test-ratio", "0.1", "--seed", "4")[2] != test


def test_no_prompt_on_both_sides(tmp_path):
    records = rows(120)
    for k, i in enumerate(range(0, 120, 10)):  # exact copies and same prompt + other answer, up to 4 deep
        records += [dict(records[i])] * (k % 3) + [{**records[i], "output": "other"}] * (k % 2)
    examples = read_file(write(tmp_path, records)).examples
    for seed in range(5):
        train, test = split_examples(examples, 0.2, seed)
        assert not {prompt_key(e) for e in train} & {prompt_key(e) for e in test}
        assert sorted(e.line for e in train + test) == list(range(1, len(records) + 1))
        assert abs(len(test) - 0.2 * len(records)) <= 3  # groups of <= 4 fill the target to within 3


def test_stratified_split_keeps_each_label_share(tmp_path):
    records = rows(230)
    counts = Counter(r["output"] for r in records)
    examples = read_file(write(tmp_path, records)).examples
    train, test = split_examples(examples, 0.15, seed=1, stratify=True)
    test_counts = Counter(e.response for e in test)
    for label, n in counts.items():
        assert test_counts[label] == math.floor(0.15 * n + 0.5)  # round half up, per label
    assert Counter(e.response for e in train) == counts - test_counts


def test_stratify_needs_labels_and_ratio_stays_in_the_outline_range(tmp_path, capsys):
    free_text = [{"instruction": f"Write a poem about {i}", "output": f"poem number {i}"} for i in range(50)]
    assert split(tmp_path, free_text, "--stratify")[0] == 2
    assert "--stratify needs class labels" in capsys.readouterr().err
    assert split(tmp_path, rows(), "--test-ratio", "0.3")[0] == 2
    assert "outside 0.1-0.2" in capsys.readouterr().err
    status, _, test, _ = split(tmp_path, rows(), "--test-ratio", "0.3", "--allow-any-ratio")
    assert status == 0 and len(test) == 60
    assert split(tmp_path, rows(4), "--test-ratio", "0.1")[0] == 2  # 0 test examples: refused
    assert "one side would be empty" in capsys.readouterr().err


def test_a_file_with_problems_is_not_split(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n\n", encoding="utf-8")
    assert main(["data", "split", str(path), "--output-dir", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists() and f"{path}:2: blank line" in capsys.readouterr().out


def test_split_refuses_to_overwrite_its_input(tmp_path, capsys):
    path = write(tmp_path, rows(), "train.jsonl")
    before = path.read_bytes()
    assert main(["data", "split", str(path)]) == 2
    assert path.read_bytes() == before and "would overwrite the input" in capsys.readouterr().err

"""`minipeft data split` (minipeft/data/split.py): deterministic, seedable, stratified on demand,
and never a prompt on both sides; files written byte for byte."""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from minipeft.data import build_report, read_file
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


def near_rows(n=100, seed=0):
    """n prompts of 8 random words, each twice: as is and with a trailing "." (Jaccard ~0.97)."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ti", "ra", "vo") for b in ("rn", "sk", "lt", "mp")]
    base = [{"instruction": "Summarize: " + " ".join(rng.sample(vocab, 8)), "output": f"s{i % 3}"} for i in range(n)]
    return [r for b in base for r in (b, {**b, "instruction": b["instruction"] + "."})]


def leaked(train_path, test_path) -> int:
    """Test examples leaked from train, by the report's own measure (exact or near prompt)."""
    return build_report(read_file(train_path), read_file(test_path))["leakage"]["leaked_test_examples"]


@pytest.mark.parametrize("stratify", [[], ["--stratify"]], ids=["plain", "stratified"])
def test_near_duplicate_prompts_stay_on_one_side(tmp_path, stratify):
    # Exact grouping alone put ~38 of 40 test prompts beside their "."-twin in train.
    status, train, test, _ = split(tmp_path, near_rows(), "--test-ratio", "0.2", *stratify)
    assert status == 0 and len(train) + len(test) == 200 and abs(len(test) - 40) <= 2
    assert leaked(tmp_path / "out" / "train.jsonl", tmp_path / "out" / "test.jsonl") == 0


@pytest.mark.parametrize("stratify", [[], ["--stratify"]], ids=["plain", "stratified"])
def test_the_bundled_sentiment_data_splits_without_a_leak(tmp_path, stratify):
    source = Path(__file__).resolve().parent.parent / "datasets" / "sentiment" / "train.jsonl"
    out = tmp_path / "out"
    assert main(["data", "split", str(source), "--output-dir", str(out), *stratify]) == 0
    assert leaked(out / "train.jsonl", out / "test.jsonl") == 0  # 8 of 30 before near duplicates were grouped
    test = Counter(e.response for e in read_file(out / "test.jsonl").examples)
    if stratify:  # near-duplicate prompts with other labels ("... is blue." / "... is great.") still fit the quotas
        counts = Counter(e.response for e in read_file(source).examples)
        assert test == {label: math.floor(0.1 * n + 0.5) for label, n in counts.items()}
    assert abs(sum(test.values()) - 30) <= 3 and len(test) == 3  # every label held out


def test_prompts_too_alike_to_split_are_refused_with_the_reason(tmp_path, capsys):
    # One template with a varying number: every prompt is a near duplicate of the next, one chain.
    records = [{"instruction": f"Translate sentence number {i} about the cat into French please", "output": str(i)}
               for i in range(100)]
    assert split(tmp_path, records)[0] == 2
    err = capsys.readouterr().err
    assert "near-duplicate prompts stay together, in 1 group(s) here, the largest of 100" in err
    assert "give a separate test file (test_file in a training config)" in err  # what to do about it


SYSTEM_PROMPT = ("You are the support assistant of Northwind Outfitters, an online shop for hiking and camping gear. "
                 "Answer customers politely and concisely, in the language they write in. Never promise delivery "
                 "dates, refunds or discounts: point to the order page or offer to open a ticket instead. If a "
                 "question is not about the shop, its products or an order, say so and steer back to the shop.")


def system_rows(n=200, seed=0):
    """`messages` rows sharing a ~400-character system prompt, each with a short distinct question."""
    rng = random.Random(seed)
    items = ["tent", "stove", "backpack", "headlamp", "sleeping bag", "rain jacket", "trekking pole", "water filter"]
    asks = ["Is the {} waterproof?", "How much does the {} weigh?", "Can I return a used {}?",
            "Does the {} come in blue?", "Is the {} in stock in size {}?"]
    return [{"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": rng.choice(asks).format(rng.choice(items), i)},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]


def test_a_shared_system_prompt_does_not_make_prompts_near_duplicates(tmp_path):
    # Compared with its system turn, every prompt was a near duplicate of every other: one group, refused.
    assert len(SYSTEM_PROMPT) > 350
    status, train, test, _ = split(tmp_path, system_rows(), "--test-ratio", "0.1")
    assert status == 0 and abs(len(test) - 20) <= 2 and len(train) + len(test) == 200
    assert leaked(tmp_path / "out" / "train.jsonl", tmp_path / "out" / "test.jsonl") == 0
    examples = read_file(write(tmp_path, system_rows())).examples
    train, test = split_examples(examples, 0.1)  # what job.run_job and the platform worker call
    assert abs(len(test) - 20) <= 2


def test_the_same_question_under_another_system_prompt_stays_on_one_side(tmp_path):
    # The system turn is left out of the comparison, not out of the groups: this is still a leak.
    records = [{"instruction": r["instruction"] + r["input"], "output": r["output"]} for r in rows(40)]
    records += [{**r, "system": "Be brief."} for r in records]
    status, train, test, _ = split(tmp_path, records, "--test-ratio", "0.2")
    assert status == 0 and len(test) == 16
    assert leaked(tmp_path / "out" / "train.jsonl", tmp_path / "out" / "test.jsonl") == 0
    train_questions = {json.loads(x)["instruction"] for x in train}
    assert not train_questions & {json.loads(x)["instruction"] for x in test}


def test_a_typo_warning_does_not_stop_the_split(tmp_path, capsys):
    # It used to say "split needs a clean file" of a file with 30 valid lines and 0 rejected.
    records = rows(30)
    records[4]["sytem"] = "Be nice."
    status, train, test, path = split(tmp_path, records, "--test-ratio", "0.1")
    assert status == 0 and len(train) + len(test) == 30
    assert f"warning: {path}:5: sytem: unknown key, ignored: a typo for 'system'?" in capsys.readouterr().err


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


def test_split_into_a_file_says_it_is_not_a_directory(tmp_path, capsys):
    path = write(tmp_path, rows())
    out = tmp_path / "out"
    out.write_text("not a directory")
    assert main(["data", "split", str(path), "--output-dir", str(out)]) == 2
    assert f"--output-dir {out}: exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "not a directory"

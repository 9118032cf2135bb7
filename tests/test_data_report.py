"""`minipeft data report` (minipeft/data/report.py, dedup.py, quality.py, report_render.py).

Near duplicates are checked against brute force: every pair's Jaccard similarity computed
directly on Python sets of character 5-grams (no hashing, no LSH). The rest against numbers
worked out by hand on small planted files."""
from __future__ import annotations

import json
import re
import random
import sys
from itertools import combinations

import pytest

from minipeft.data import build_report, read_file
from minipeft.data.cli import main
from minipeft.data.dedup import near_duplicate_pairs, normalize_text
from minipeft.data.quality import distinct_n, words
from minipeft.data.report import size_advice

VOCAB = ("river stone cloud lantern copper meadow falcon harbor violet ember tundra canyon orchard signal marble "
         "quartz willow summit beacon thistle").split()


def sentence(rng, n=14):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def write(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def brute_force_pairs(texts, threshold, n=5):
    grams = [{t[i:i + n] for i in range(len(t) - n + 1)} or {t} for t in texts]
    sims = ((i, j, len(grams[i] & grams[j]) / len(grams[i] | grams[j])) for i, j in combinations(range(len(texts)), 2))
    return [(i, j) for i, j, s in sims if s >= threshold]


def test_near_duplicates_match_brute_force_jaccard():
    rng = random.Random(0)
    texts = [sentence(rng) for _ in range(60)]
    for k in range(0, 60, 6):  # plant edits of growing size: some stay above 0.8, some fall below
        words_ = texts[k].split()
        for w in range(k // 12 + 1):
            words_[w * 3] = "zephyr"
        texts.append(" ".join(words_))
    texts = list(dict.fromkeys(normalize_text(t) for t in texts))
    # The join is exact (simjoin.py), so both thresholds reproduce brute force; the edits leave 2
    # pairs >= 0.8 (one word changed) and 4 >= 0.6.
    for threshold, planted in ((0.8, 2), (0.6, 4)):
        expected = brute_force_pairs(texts, threshold)
        assert [(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold)] == expected
        assert len(expected) >= planted



@pytest.mark.parametrize("threshold", [0.5, 0.4, 0.3, 0.2, 0.1])
def test_near_duplicates_match_brute_force_at_a_lowered_threshold(threshold):
    """--near-threshold below the default: the prefixes follow it, or pairs are missed."""
    rng = random.Random(2)
    texts = []
    for _ in range(15):  # families of rewrites: pairs at every similarity from ~0.1 up
        base = sentence(rng, 20).split()
        for _ in range(4):
            words_ = base[:]
            for _ in range(rng.randint(2, 10)):
                words_[rng.randrange(len(words_))] = rng.choice(VOCAB)
            texts.append(" ".join(words_))
    texts = list(dict.fromkeys(normalize_text(t) for t in texts))
    expected = brute_force_pairs(texts, threshold)
    assert len(expected) >= 10
    assert [(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold)] == expected

def planted_rows():
    """60 distinct classification rows, then an exact copy (case and spaces changed), a near copy
    (one word changed), a conflicting label, and a label spelled differently."""
    rng = random.Random(1)
    rows = [{"instruction": "Classify the sentiment.", "input": sentence(rng), "output": rng.choice(["pos", "neg"])}
            for _ in range(60)]
    rows.append({**rows[2], "input": "  " + rows[2]["input"].upper()})  # line 61 = line 3
    near = rows[4]["input"].split()
    near[7] = "zephyr"
    rows.append({**rows[4], "input": " ".join(near)})  # line 62 ~ line 5
    rows.append({**rows[6], "output": "neg" if rows[6]["output"] == "pos" else "pos"})  # line 63 conflicts with 7
    rows.append({**rows[8], "input": sentence(rng), "output": rows[8]["output"].capitalize()})  # line 64
    return rows


def test_duplicates_conflicts_and_spellings_are_found_with_line_numbers(tmp_path):
    report = build_report(read_file(write(tmp_path, planted_rows())))
    dup = report["duplicates"]
    assert dup["exact"] == [[3, 61]] and dup["exact_extra_copies"] == 1
    near = {tuple(x["lines"]) for x in dup["near"]}
    assert (5, 62) in near and all(pair in {(5, 62), (7, 63)} for pair in near)  # nothing unrelated
    (conflict,) = report["accuracy"]["label_conflicts"]
    assert sorted(line for o in conflict["outputs"] for line in o["lines"]) == [7, 63]
    (spelling,) = [f for f in report["consistency"] if "other_spellings" in f]
    assert spelling["lines"] == [64] and list(spelling["other_spellings"].values()) == [[64]]
    main, (other,) = re.fullmatch(r"label '(.*)' written exactly so", spelling["check"])[1], spelling["other_spellings"]
    assert main != other and main.lower().strip() == other.lower().strip()  # it names the spelling the others miss


def test_format_consistency_flags_the_few_non_json_outputs(tmp_path):
    rows = [{"instruction": f"Extract {i}", "output": json.dumps({"name": f"n{i}", "age": i})} for i in range(12)]
    rows[3]["output"] = "name: n3, age: 3"
    rows[8]["output"] = json.dumps({"name": "n8"})
    rows[10]["output"] += " "
    findings = {f["check"]: f for f in build_report(read_file(write(tmp_path, rows)))["consistency"]}
    assert findings["output is JSON (object or array)"]["lines"] == [4]
    assert findings["JSON output has exactly the keys ['age', 'name']"]["lines"] == [9]
    assert findings["output has no leading or trailing whitespace"]["lines"] == [11]


def test_diversity_by_hand():
    assert words("Hello, world! 你好世界 x2") == ["hello", "world", "你", "好", "世", "界", "x2"]
    outputs = [["a", "b", "a"], ["a", "b"]]  # unigrams a b a a b: 2 distinct of 5; bigrams ab ba ab: 2 of 3
    assert distinct_n(outputs, 1) == 2 / 5 and distinct_n(outputs, 2) == 2 / 3
    assert distinct_n([["a"]], 2) is None


@pytest.mark.parametrize("task, count, verdict", [
    ("classification", 99, "below"), ("classification", 100, "inside"), ("classification", 500, "inside"),
    ("classification", 501, "above"), ("dialogue-style", 499, "below"), ("dialogue-style", 2001, "above"),
    ("domain", 2000, "inside"), ("domain", 10001, "above"), ("reasoning", 9999, "below"),
    ("reasoning", 10 ** 6, "inside"),
])
def test_size_advice_follows_the_outline_table(task, count, verdict):
    (row,) = size_advice(count, task)["rows"]
    assert (row["task"], row["verdict"]) == (task, verdict)
    assert len(size_advice(count)["rows"]) == 4


def test_leakage_exact_and_near(tmp_path):
    rows = planted_rows()[:60]
    near = rows[20]["input"].split()
    near[5] = "zephyr"
    test_rows = [rows[10], {**rows[20], "input": " ".join(near)}, {**rows[0], "input": "an unrelated prompt entirely"}]
    report = build_report(read_file(write(tmp_path, rows)), read_file(write(tmp_path, test_rows, "test.jsonl")))
    leak = report["leakage"]
    assert [(x["test_line"], x["train_line"]) for x in leak["exact"]] == [(1, 11)]
    assert [(x["test_line"], x["train_line"]) for x in leak["near"]] == [(2, 21)]
    assert leak["leaked_test_examples"] == 2 and leak["leaked_fraction"] == round(2 / 3, 4)


class CharTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [3 + ord(c) % 997 for c in text] + [2] * eos


def test_supervised_fraction_by_hand(tmp_path):
    path = write(tmp_path, [{"instruction": "Say hi", "output": "hello"}])
    chars = build_report(read_file(path))["supervised"]
    assert chars["fraction"] == round(5 / (6 + 5), 4) and chars["template"] is None
    # Plain template, one id per character: <s> "User: Say hi\nAssistant:" | "hello" </s> supervised.
    prompt, reply = 1 + len("User: Say hi\nAssistant:"), len("hello") + 1
    tokens = build_report(read_file(path), tokenizer=CharTokenizer())
    assert tokens["supervised"]["fraction"] == round(reply / (prompt + reply), 4)
    assert tokens["representativeness"]["lengths"]["max"] == prompt + reply


def test_report_files_and_sections(tmp_path, capsys):
    path = write(tmp_path, planted_rows())
    test_path = write(tmp_path, planted_rows()[:3], "test.jsonl")
    out = tmp_path / "rep"
    assert main(["data", "report", str(path), "--test", str(test_path), "--task", "classification",
                 "--output", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("Size (适量性)", "Accuracy (准确性", "Consistency (一致性", "Duplicates (重复数据)",
                    "Diversity (多样性)", "Representativeness (代表性)", "Leakage (数据泄露)", "Supervised tokens"):
        assert f"## {heading}" in md
    assert "| classification | 100-500 | 64: below |" in md and "- lines 3, 61" in md
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["leakage"]["leaked_test_examples"] == 3 and data["size"]["rows"][0]["verdict"] == "below"
    assert (out / "length_histogram.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "3 leaked test examples" in capsys.readouterr().out


def test_report_without_matplotlib_writes_no_png_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "rep"
    assert main(["data", "report", str(write(tmp_path, planted_rows())), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert "no histogram image" in (out / "report.md").read_text(encoding="utf-8")


def test_a_rewritten_report_replaces_the_whole_set(tmp_path, monkeypatch):
    """report.json, report.md and the histogram are swapped in together: a histogram of earlier data
    does not outlive a report that draws none, and a crash while writing keeps the previous set."""
    out = tmp_path / "rep"
    path = write(tmp_path, planted_rows())
    assert main(["data", "report", str(path), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "length_histogram.png" in before

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("minipeft.data.report_render.render_markdown", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["data", "report", str(write(tmp_path, planted_rows()[:10], "other.jsonl")), "--output", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["data", "report", str(path), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_report_covers_valid_lines_and_counts_the_rest(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{broken\n", encoding="utf-8")
    assert main(["data", "report", str(path), "--output", str(tmp_path / "r")]) == 0
    acc = json.loads((tmp_path / "r" / "report.json").read_text())["accuracy"]
    assert (acc["valid"], acc["rejected"]) == (1, 1) and "2:2: invalid JSON" in acc["problems"][0]
    assert "1 valid, 1 rejected" in capsys.readouterr().out


@pytest.mark.parametrize("name, flag", [("train.report", None), ("train.jsonl", "report.md")])
def test_a_report_directory_that_is_a_file_is_a_usage_error(tmp_path, capsys, name, flag):
    # The default output of train.report is itself; --output report.md (read as a file name)
    # may name an existing file: exit status 2 naming it, no traceback, the file left alone.
    path = write(tmp_path, planted_rows()[:5], name)
    target = path if flag is None else tmp_path / flag
    target.write_bytes(before := target.read_bytes() if target.exists() else b"# old notes\n")
    args = ["data", "report", str(path)] + ([] if flag is None else ["--output", str(target)])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{target}: exists and is not a directory" in err and "Traceback" not in err
    assert target.read_bytes() == before

"""Write a report dict (report.py) as report.json, report.md and, when matplotlib is installed,
length_histogram.png. Markdown lists are cut at SHOWN items; report.json keeps them all.
"""
from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from ..files import json_bytes, staged_dir
from .jsonl import PathLike
from .problems import line_ranges

SHOWN = 20
PNG_NAME = "length_histogram.png"
# The outline's criteria (3.2) in its own words, as headings.
CRITERIA = {"size": "Size (适量性)", "accuracy": "Accuracy (准确性, 标注错误)",
            "consistency": "Consistency (一致性, 格式混乱)", "duplicates": "Duplicates (重复数据)",
            "diversity": "Diversity (多样性)",
            "representativeness": "Representativeness (代表性)", "leakage": "Leakage (数据泄露)",
            "supervised": "Supervised tokens"}


def write_report(report: dict[str, Any], out_dir: PathLike) -> list[Path]:
    """Write the report files into `out_dir`, staged and swapped in together (files.staged_dir: a
    crash leaves the previous report whole, and a histogram of earlier data is removed when none is
    drawn now); returns the paths written."""
    out = Path(out_dir)
    png = histogram_png(report["representativeness"]["lengths"])
    contents = {"report.json": json_bytes(report), "report.md": render_markdown(report, png is not None).encode("utf-8")}
    if png is not None:
        contents[PNG_NAME] = png
    with staged_dir(out, stale=PNG_NAME) as tmp:
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
    return [out / name for name in contents]


def histogram_png(lengths: dict[str, Any]) -> Optional[bytes]:
    """The length histogram as PNG bytes, or None without matplotlib (or without examples)."""
    try:
        from matplotlib.figure import Figure  # Figure, not pyplot: no GUI backend, no global state
    except ImportError:
        return None
    if not lengths.get("count"):
        return None
    counts, edges = lengths["histogram"]["counts"], lengths["histogram"]["edges"]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.stairs(counts, edges, fill=True)
    ax.set(xlabel=f"example length ({lengths['unit']})", ylabel="examples", title="Length distribution")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def render_markdown(report: dict[str, Any], has_png: bool = False) -> str:
    acc = report["accuracy"]
    head = [f"# Data quality report: {report['file']}", "",
            f"Format {report['format']}: {acc['valid']} valid examples of {acc['lines']} lines, {acc['rejected']} "
            "rejected (the report covers the valid ones)."]
    sections: dict[str, Callable[[Any], list[str]]] = {
        "size": _size, "accuracy": _accuracy, "consistency": _consistency, "duplicates": _duplicates,
        "diversity": _diversity, "representativeness": partial(_representativeness, has_png=has_png),
        "leakage": _leakage, "supervised": _supervised}
    body = []
    for key, render in sections.items():
        body += ["", f"## {CRITERIA[key]}", "", *render(report[key])]
    return "\n".join(head + body) + "\n"


def _bullets(items: list[str]) -> list[str]:
    if not items:
        return ["- none"]
    more = [f"- ... {len(items) - SHOWN} more in report.json"] if len(items) > SHOWN else []
    return [f"- {x}" for x in items[:SHOWN]] + more


def _size(size: dict[str, Any]) -> list[str]:
    rows = ["| task type | suggested | this file |", "| --- | --- | --- |"]
    for r in size["rows"]:
        span = f"{r['low']}-{r['high']}" if r["high"] else f"{r['low']}+"
        rows.append(f"| {r['task']} | {span} | {size['count']}: {r['verdict']} |")
    advice = {"below": "collect more examples", "above": "quality beats quantity: deduplicate, sample, or check "
              "the task type", "inside": "inside the suggested range"}
    note = [] if size["task"] is None else ["", f"Advice: {advice[size['rows'][0]['verdict']]}."]
    return rows + note + ["", "Counts from the outline's table (3.3); a starting point, not a law."]


def _accuracy(acc: dict[str, Any]) -> list[str]:
    lines = [f"{acc['problem_count']} problem(s) found by the check"
             + (f"; first ones (run `minipeft data check {acc['file']}` for all):" if acc["problems"] else ".")]
    lines += [f"    {p}" for p in acc["problems"]]
    conflicts = acc["label_conflicts"]
    lines += ["", f"{len(conflicts)} prompt(s) with conflicting outputs (label errors for a classifier; "
              "for open generation check they are intended):"]
    return lines + _bullets([f"{c['prompt']!r}: " + "; ".join(f"{o['output']!r} (lines {line_ranges(o['lines'])})"
                                                              for o in c["outputs"]) for c in conflicts])


def _consistency(findings: list[dict[str, Any]]) -> list[str]:
    if not findings:
        return ["No exceptions to the file's conventions found."]
    items = []
    for f in findings:
        held, broken = ("true", "false") if f["convention"] else ("false", "true")
        others = "; ".join(f"{w!r} on lines {line_ranges(n)}" for w, n in f.get("other_spellings", {}).items())
        exceptions = f"other spellings: {others}" if others else f"{broken} for lines {line_ranges(f['lines'])}"
        items.append(f"{f['check']}: {held} for {f['count']} of {f['total']}; {exceptions}")
    return _bullets(items)


def _duplicates(dup: dict[str, Any]) -> list[str]:
    lines = [f"{len(dup['exact'])} group(s) of exact duplicates (after normalization), {dup['exact_extra_copies']} "
             "extra copies:"]
    lines += _bullets([f"lines {line_ranges(g)}" for g in dup["exact"]])
    lines += ["", f"{len(dup['near'])} near-duplicate pair(s) (Jaccard of character {dup['ngram']}-grams >= "
              f"{dup['threshold']}):"]
    return lines + _bullets([f"lines {a} and {b}: {s:.2f}" for (a, b), s in
                             ((x["lines"], x["similarity"]) for x in dup["near"])])


def _diversity(div: dict[str, Any]) -> list[str]:
    firsts = ", ".join(f"{w} ({n})" for w, n in div["top_first_words"])
    return [f"- distinct prompts: {div['distinct_prompts']}", f"- distinct outputs: {div['distinct_outputs']}",
            f"- distinct-1 / distinct-2 of outputs: {_na(div['distinct_1'])} / {_na(div['distinct_2'])}",
            f"- most common first words of the user turn: {firsts}"]


def _na(value: Optional[float]) -> str:
    return "n/a (outputs too short)" if value is None else f"{value:.4g}"


def _representativeness(rep: dict[str, Any], has_png: bool) -> list[str]:
    ls = rep["lengths"]
    if not ls["count"]:
        return ["No valid examples."]
    lines = [f"Length in {ls['unit']}: min {ls['min']}, mean {ls['mean']}, median {ls['p50']}, p90 {ls['p90']}, "
             f"p99 {ls['p99']}, max {ls['max']}; longest at lines {', '.join(map(str, ls['longest_lines']))}."]
    lines += ["", f"![length histogram]({PNG_NAME})" if has_png else "(no histogram image: matplotlib not installed)"]
    train, test = rep["labels"]["train"], rep["labels"]["test"]
    if train:
        columns = ["label", "train"] + (["test"] if test is not None else [])
        lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for k in list(train) + [k for k in test or {} if k not in train]:
            cells = [repr(k), str(train.get(k, 0))] + ([str(test.get(k, 0))] if test is not None else [])
            lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Whether this matches real traffic only you can tell: compare with production inputs."]


def _leakage(leak: Optional[dict[str, Any]]) -> list[str]:
    if leak is None:
        return ["No test file given (--test FILE)."]
    lines = [f"{leak['leaked_test_examples']} of {leak['valid']} test examples ({leak['leaked_fraction']:.1%}) "
             "have a prompt that is in the training file:"]
    items = [f"test line {x['test_line']} = train line {x['train_line']}" for x in leak["exact"]]
    items += [f"test line {x['test_line']} ~ train line {x['train_line']} ({x['similarity']:.2f})"
              for x in leak["near"]]
    return lines + _bullets(items)


def _supervised(sup: dict[str, Any]) -> list[str]:
    how = (f"tokens of the examples rendered by the {sup['template']} template" if sup["template"] else
           "characters of the turns' content (an approximation that leaves out the template's text)")
    return [f"Supervised share: {sup['fraction']:.1%} of the {how}. These are the assistant replies, the part "
            "the loss is computed on when prompts are masked."]

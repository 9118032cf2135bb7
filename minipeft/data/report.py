"""`minipeft data report`: the data-quality report, as one JSON-ready dict whose sections follow
the outline's section 3.2 (what good data is, what to avoid) and 3.3 (how much of it):

    accuracy            invalid lines (from the check) and label conflicts (quality.py)
    consistency         format conventions and their exceptions (quality.py)      "format chaos"
    duplicates          exact and near duplicates, with line numbers (dedup.py)
    diversity           distinct prompts/outputs, distinct-1/2, first words (quality.py)
    representativeness  length histogram, label distribution (train vs test)
    leakage             test prompts that appear, exactly or nearly, in train      (with --test)
    size                the outline's table for the task type: inside, below or above
    supervised          the share of tokens the loss sees, prompts masked (measure.py)

report_render.py turns it into report.md (+ a PNG histogram).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import numpy as np

from ..templates import ChatTemplate, get_template
from .dedup import (NEAR_THRESHOLD, NGRAM, example_key, exact_groups, near_duplicate_pairs, normalize_text, prompt_key,
                    question_key)
from .formats import Example
from .loader import LoadResult
from .measure import DEFAULT_TEMPLATE, Encoder, measure
from .quality import diversity, format_consistency, label_conflicts, labels

# The outline's table (section 3.3): examples suggested per task type; None = no upper bound.
TASK_SIZES = {"classification": (100, 500), "dialogue-style": (500, 2000), "domain": (2000, 10000),
              "reasoning": (10000, None)}
SHOWN_PROBLEMS = 20


def build_report(train: LoadResult, test: Optional[LoadResult] = None, task: Optional[str] = None,
                 tokenizer: Optional[Encoder] = None, template: Optional[ChatTemplate] = None,
                 near_threshold: float = NEAR_THRESHOLD) -> dict[str, Any]:
    """The report of `train` (and of its leakage into `test`). Lengths are tokens of the example
    rendered by `template` (default plain) with a tokenizer, else characters (measure.py)."""
    examples = train.examples
    template = template or get_template(DEFAULT_TEMPLATE)
    unit = "tokens" if tokenizer is not None else "characters"
    sizes = np.array([measure(e.messages, tokenizer, template) for e in examples], dtype=np.int64).reshape(-1, 2)
    train_labels = labels(examples)
    return {
        "file": train.path,
        "format": train.format,
        "accuracy": {**_validity(train), "label_conflicts": label_conflicts(examples)},
        "consistency": format_consistency(examples),
        "duplicates": duplicates(examples, near_threshold),
        "diversity": diversity(examples),
        "representativeness": {
            "lengths": length_stats(examples, sizes[:, 0], unit),
            "labels": {"train": _counts(train_labels),
                       "test": _counts([normalize_text(e.response) for e in test.examples])
                       if test and train_labels else None},
        },
        "leakage": {**_validity(test), **leakage(examples, test.examples, near_threshold)} if test else None,
        "size": size_advice(len(examples), task),
        "supervised": {"fraction": round(float(sizes[:, 1].sum() / max(1, sizes[:, 0].sum())), 4), "unit": unit,
                       "template": template.name if tokenizer else None},
    }


def _validity(result: LoadResult) -> dict[str, Any]:
    rejected = len(result.rejected)
    return {"file": result.path, "lines": len(result.lines), "valid": len(result.lines) - rejected,
            "rejected": rejected, "problems": [str(p) for p in result.problems[:SHOWN_PROBLEMS]],
            "problem_count": len(result.problems)}


def _counts(keys: Optional[list[str]]) -> Optional[dict[str, int]]:
    return dict(Counter(keys).most_common()) if keys is not None else None


def duplicates(examples: list[Example], threshold: float) -> dict[str, Any]:
    """Exact groups (line lists) and near pairs between distinct examples."""
    keys = [example_key(e) for e in examples]
    exact = [[examples[i].line for i in g] for g in exact_groups(keys)]
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    distinct = list(first)
    near = [{"lines": [examples[first[distinct[i]]].line, examples[first[distinct[j]]].line], "similarity": s}
            for i, j, s in near_duplicate_pairs(distinct, threshold)]
    return {"exact": exact, "exact_extra_copies": sum(len(g) - 1 for g in exact), "near": near,
            "threshold": threshold, "ngram": NGRAM}


def leakage(train: list[Example], test: list[Example], threshold: float) -> dict[str, Any]:
    """Test examples whose prompt is in train: exactly (normalized equal) or nearly (the question,
    dedup.question_key, at J >= threshold), by the rule split keeps groups together with."""
    train_first: dict[str, int] = {}
    for e in train:
        train_first.setdefault(prompt_key(e), e.line)
    exact = [{"test_line": e.line, "train_line": train_first[k]} for e in test if (k := prompt_key(e)) in train_first]
    exact_lines = {x["test_line"] for x in exact}
    rest = [e for e in test if e.line not in exact_lines]
    train_questions: dict[str, int] = {}
    for e in train:
        train_questions.setdefault(question_key(e), e.line)
    texts = list(train_questions) + [question_key(e) for e in rest]
    n = len(train_questions)
    near = [{"test_line": rest[j - n].line, "train_line": train_questions[texts[i]], "similarity": s}
            for i, j, s in near_duplicate_pairs(texts, threshold) if i < n <= j]
    leaked = exact_lines | {x["test_line"] for x in near}
    return {"exact": exact, "near": near, "leaked_test_examples": len(leaked),
            "leaked_fraction": round(len(leaked) / len(test), 4) if test else 0.0}


def length_stats(examples: list[Example], lengths: np.ndarray, unit: str, bins: int = 20) -> dict[str, Any]:
    """Summary and histogram of `lengths` (N,), the length of each example."""
    if lengths.size == 0:
        return {"unit": unit, "count": 0}
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(np.unique(lengths)))))
    p50, p90, p99 = (round(float(v), 1) for v in np.percentile(lengths, [50, 90, 99]))
    return {"unit": unit, "count": int(lengths.size), "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 1), "p50": p50, "p90": p90, "p99": p99, "max": int(lengths.max()),
            "histogram": {"counts": counts.tolist(), "edges": [round(float(x), 1) for x in edges]},
            "longest_lines": [examples[i].line for i in np.argsort(-lengths, kind="stable")[:5]]}


def size_advice(count: int, task: Optional[str] = None) -> dict[str, Any]:
    """Where `count` falls in the outline's table: for `task`, or for every task type if None."""
    if task is not None and task not in TASK_SIZES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_SIZES)}")
    rows = []
    for name, (low, high) in TASK_SIZES.items():
        if task in (None, name):
            verdict = "below" if count < low else "above" if high is not None and count > high else "inside"
            rows.append({"task": name, "low": low, "high": high, "verdict": verdict})
    return {"count": count, "task": task, "rows": rows}

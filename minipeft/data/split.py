"""`minipeft data split`: a deterministic train/test split in which no prompt is on both sides.

- Groups: examples with the same normalized prompt (dedup.prompt_key) go to the same side. That
  covers exact duplicates and goes further: the same question with another answer cannot leak.
  So do near duplicates, by the rule the report detects leaks with (dedup.near_duplicate_pairs of
  the dedup.question_key, the prompt without its system turn, Jaccard >= NEAR_THRESHOLD): prompts
  joined by a chain of near pairs form one group (connected components, union-find), so the
  report finds no leak between the two files. A shared system prompt joins nothing.
- Selection: the groups are shuffled by random.Random(seed) and taken into test, in that order,
  whenever they still fit in round_half_up(ratio * N); the rest is train. Same file + seed = same split.
- Stratified (for classification): the same with one quota per label (the normalized output,
  quality.labels), round_half_up(ratio * its count), so the label mix of test follows train (a
  label seen once stays in train). A group whose examples carry different labels (a conflict, or
  near-duplicate prompts with different answers) is taken only if it fits the quota of each.
- Ratio: the outline advises holding out 10-20% for evaluation; outside that range is an error
  unless allow_any_ratio is set (a usage error, exit status 2, that names the override).
Only a file that passes the check is split; its lines are written byte for byte, in file order.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from .dedup import near_duplicate_pairs, normalize_text, question_key
from .formats import Example
from .jsonl import PathLike, check_not_input, write_atomic
from .loader import LoadResult
from .problems import UsageError
from .quality import labels

RATIO_RANGE = (0.1, 0.2)


def check_ratio(ratio: float, allow_any_ratio: bool = False) -> None:
    if not 0 < ratio < 1:
        raise UsageError(f"--test-ratio must be between 0 and 1, got {ratio}")
    low, high = RATIO_RANGE
    if not allow_any_ratio and not low <= ratio <= high:
        raise UsageError(f"--test-ratio {ratio} is outside {low}-{high}, the share the outline advises holding "
                         "out; pass --allow-any-ratio to use it anyway")


def split_examples(examples: list[Example], test_ratio: float, seed: int = 0,
                   stratify: bool = False) -> tuple[list[Example], list[Example]]:
    """(train, test), each in file order. Raises UsageError when a side would be empty or when
    stratify is asked of outputs that are not labels."""
    keys = _labels(examples, stratify)
    quota = {k: math.floor(test_ratio * n + 0.5) for k, n in Counter(keys).items()}
    groups = _prompt_groups(examples)
    order = groups[:]
    random.Random(seed).shuffle(order)
    taken: Counter[Optional[str]] = Counter()
    test: set[int] = set()
    for g in order:
        need = Counter(keys[i] for i in g)
        if all(taken[k] + n <= quota[k] for k, n in need.items()):
            test.update(g)
            taken += need
    if not test or len(test) == len(examples):
        raise UsageError(f"cannot split {len(examples)} examples at --test-ratio {test_ratio}: one side would be "
                         f"empty (too few examples, or too few per label with --stratify; equal and near-duplicate "
                         f"prompts stay together, in {len(groups)} group(s) here, the largest of "
                         f"{max(map(len, groups))}): give a separate test file (test_file in a training config), "
                         f"or a ratio that fits the groups")
    return ([e for i, e in enumerate(examples) if i not in test], [e for i, e in enumerate(examples) if i in test])


def _labels(examples: list[Example], stratify: bool) -> list[Optional[str]]:
    """Each example's label (quality.labels) when stratifying, else None for all."""
    if not stratify:
        return [None] * len(examples)
    keys = labels(examples)
    if keys is None:
        distinct = len({normalize_text(e.response) for e in examples})
        raise UsageError(f"--stratify needs class labels as outputs, but {distinct} of {len(examples)} outputs are "
                         "distinct: split without --stratify")
    return keys


def _prompt_groups(examples: list[Example]) -> list[list[int]]:
    """Indices of examples whose questions (dedup.question_key; equal prompts have equal ones) are
    equal or near duplicates (transitively), each group sorted, groups in order of first sight."""
    keys = [question_key(e) for e in examples]
    index: dict[str, int] = {}  # distinct question -> its number
    for k in keys:
        index.setdefault(k, len(index))
    root = list(range(len(index)))  # union-find over the distinct questions

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for i, j, _ in near_duplicate_pairs(list(index)):
        root[find(j)] = find(i)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[find(index[k])].append(i)
    return list(groups.values())


def write_split(result: LoadResult, train: list[Example], test: list[Example], out_dir: PathLike) -> list[Path]:
    """Write train.jsonl and test.jsonl into `out_dir` (never over the input file)."""
    out = Path(out_dir)
    paths = [out / "train.jsonl", out / "test.jsonl"]
    for p in paths:
        check_not_input(p, result.path, "--output-dir")
    lines = {line.number: line for line in result.lines}
    for p, part in zip(paths, (train, test)):
        write_atomic(p, (lines[e.line].body + b"\n" for e in part))
    return paths

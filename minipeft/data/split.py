"""`minipeft data split`: a deterministic train/test split in which no prompt is on both sides.

- Groups: examples with the same normalized prompt (dedup.prompt_key) go to the same side. That
  covers exact duplicates and goes further: the same question with another answer cannot leak.
- Selection: the groups are shuffled by random.Random(seed) and taken into test, in that order,
  whenever they still fit in round_half_up(ratio * N); the rest is train. Same file + seed = same split.
- Stratified (for classification): the same per label (the normalized output, quality.labels),
  each label getting round_half_up(ratio * its count) test examples, so the label mix of test
  follows train (a label seen once stays in train). A group whose examples carry different labels
  (a conflict) follows the label of its first example.
- Ratio: the outline advises holding out 10-20% for evaluation; outside that range is an error
  unless allow_any_ratio is set (a usage error, exit status 2, that names the override).
Only a file that passes the check is split; its lines are written byte for byte, in file order.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .dedup import normalize_text, prompt_key
from .formats import Example
from .jsonl import PathLike, write_atomic
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
    strata = _strata(examples, stratify)
    rng = random.Random(seed)
    test: set[int] = set()
    for groups in strata.values():
        target = math.floor(test_ratio * sum(len(g) for g in groups) + 0.5)
        order = groups[:]
        rng.shuffle(order)
        taken = 0
        for g in order:
            if taken + len(g) <= target:
                test.update(g)
                taken += len(g)
    if not test or len(test) == len(examples):
        raise UsageError(f"cannot split {len(examples)} examples at --test-ratio {test_ratio}: one side would be "
                         "empty (too few examples, or too few per label with --stratify)")
    return ([e for i, e in enumerate(examples) if i not in test], [e for i, e in enumerate(examples) if i in test])


def _strata(examples: list[Example], stratify: bool) -> dict[Optional[str], list[list[int]]]:
    """Label (None unstratified) -> groups of indices sharing a prompt, in order of first sight."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[prompt_key(e)].append(i)
    if not stratify:
        return {None: list(groups.values())}
    keys = labels(examples)
    if keys is None:
        distinct = len({normalize_text(e.response) for e in examples})
        raise UsageError(f"--stratify needs class labels as outputs, but {distinct} of {len(examples)} outputs are "
                         "distinct: split without --stratify")
    strata: dict[Optional[str], list[list[int]]] = defaultdict(list)
    for g in groups.values():
        strata[keys[g[0]]].append(g)
    return strata


def write_split(result: LoadResult, train: list[Example], test: list[Example], out_dir: PathLike) -> list[Path]:
    """Write train.jsonl and test.jsonl into `out_dir` (never over the input file)."""
    out = Path(out_dir)
    paths = [out / "train.jsonl", out / "test.jsonl"]
    source = Path(result.path).resolve()
    for p in paths:
        if p.resolve() == source:
            raise UsageError(f"{p} would overwrite the input file; choose another --output-dir")
    lines = {line.number: line for line in result.lines}
    for p, part in zip(paths, (train, test)):
        write_atomic(p, (lines[e.line].body + b"\n" for e in part))
    return paths

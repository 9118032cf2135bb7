"""Duplicates: exact (identical after normalization) and near (similar after normalization).

Normalization: Unicode NFKC, case folding, every run of whitespace -> one space. Two texts are
exact duplicates when their normalized forms are equal; near duplicates when the Jaccard
similarity of their sets of character 5-grams is >= NEAR_THRESHOLD = 0.8:

    J(a, b) = |S(a) ∩ S(b)| / |S(a) ∪ S(b)|,   S(t) = {t[i:i+5]}   (texts of <= 5 chars: {t})

Characters rather than words so that Chinese (no spaces) and English are treated alike; 0.8 is
the threshold of Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better".
One changed word in a 20-word sentence gives J ~ 0.8-0.85.

Comparing all pairs is O(N^2), so pairs come from prefix filtering (simjoin.py): an exact
similarity join that never misses a pair at or above the threshold, whatever the threshold. It
replaced MinHash LSH, which could miss pairs (probability <= 1e-6 at the threshold) and was slower
at every threshold on benchmarks/dedup_speed.py (5k texts: 1.6 / 56 / 196 CPU s at t = 0.8 / 0.5 /
0.3, the join 1.3 / 3.6 / 5.5; 20k: LSH 9.9 s at 0.8 and out of 4 GiB at 0.5, the join 7.3 / 32 /
80 s). The join's time grows as t falls (more of each set is indexed) and when many texts share
their rarest n-grams (a template): those pairs are candidates and are verified.

Prompts are near duplicates by their question_key, the prompt without its system turn: a shared
system prompt says nothing about whether two questions are the same. (A shared instruction
template still counts: its examples are near duplicates when what differs is short beside it.)
"""
from __future__ import annotations

import unicodedata
import zlib
from collections import defaultdict
from typing import Sequence

from .formats import Example
from .simjoin import jaccard_pairs

NGRAM = 5
NEAR_THRESHOLD = 0.8


def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_key(example: Example) -> str:
    """Whole example (every turn with its role), normalized: equal keys = exact duplicates."""
    return normalize_text(example.text)


def prompt_key(example: Example) -> str:
    """What the model is shown, normalized: equal keys = the same question."""
    return normalize_text(example.prompt)


def question_key(example: Example) -> str:
    """The prompt without its system turn, normalized: what near-duplicate prompts are judged on,
    by the split and the report's leak check alike. A system prompt shared by a file (often
    hundreds of characters) would otherwise make every pair of short questions near duplicates."""
    return normalize_text(example.question)


def exact_groups(keys: Sequence[str]) -> list[list[int]]:
    """Indices of equal keys, one group per key seen more than once, in order of first sight."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return [g for g in groups.values() if len(g) > 1]


def shingles(text: str, n: int = NGRAM) -> frozenset[int]:
    """The set of character n-grams of `text` (already normalized), each as a CRC-32."""
    grams = [text] if len(text) <= n else [text[i:i + n] for i in range(len(text) - n + 1)]
    return frozenset(map(zlib.crc32, map(str.encode, grams))) if text else frozenset()  # UTF-8


def near_duplicate_pairs(texts: Sequence[str], threshold: float = NEAR_THRESHOLD) -> list[tuple[int, int, float]]:
    """(i, j, J) for i < j with J(texts[i], texts[j]) >= threshold in (0, 1], sorted, J rounded to
    4 places: exactly the pairs comparing all pairs finds (simjoin.jaccard_pairs). Pass normalized,
    distinct texts: equal ones are exact duplicates, reported separately."""
    return [(i, j, round(s, 4)) for i, j, s in jaccard_pairs([shingles(t) for t in texts], threshold)]

"""Duplicates: exact (identical after normalization) and near (similar after normalization).

Normalization: Unicode NFKC, case folding, every run of whitespace -> one space. Two texts are
exact duplicates when their normalized forms are equal; near duplicates when the Jaccard
similarity of their sets of character 5-grams is >= NEAR_THRESHOLD = 0.8:

    J(a, b) = |S(a) ∩ S(b)| / |S(a) ∪ S(b)|,   S(t) = {t[i:i+5]}   (texts of <= 5 chars: {t})

Characters rather than words so that Chinese (no spaces) and English are treated alike; 0.8 is
the threshold of Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better".
One changed word in a 20-word sentence gives J ~ 0.8-0.85.

Comparing all pairs is O(N^2), so candidates come from MinHash LSH (Broder 1997; Leskovec et
al., Mining of Massive Datasets, ch. 3): 128 hash functions h(x) = (a*x + b) mod (2^31 - 1) give
a signature whose entries agree with probability J; the signature is cut into 32 bands of 4 rows,
and texts sharing a band are candidates. P(candidate) = 1 - (1 - J^4)^32: > 0.9999 at J = 0.8,
0.87 at J = 0.5. Every candidate is then verified with the exact J above, so no pair is reported
below the threshold; recall is that probability (1 - 5e-8 at the default).

Prompts are near duplicates by their question_key, the prompt without its system turn: a shared
system prompt says nothing about whether two questions are the same. (A shared instruction
template still counts: its examples are near duplicates when what differs is short beside it.)
"""
from __future__ import annotations

import unicodedata
import zlib
from collections import defaultdict
from itertools import combinations
from typing import Sequence

import numpy as np

from .formats import Example

NGRAM = 5
NEAR_THRESHOLD = 0.8
NUM_PERM, BANDS = 128, 32
_PRIME = (1 << 31) - 1  # Mersenne prime: a * x < 2^62 fits in uint64, no overflow
_rng = np.random.default_rng(0)  # fixed: the same file always gives the same pairs
_A = _rng.integers(1, _PRIME, NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, NUM_PERM, dtype=np.uint64)


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
    grams = [text] if len(text) <= n else (text[i:i + n] for i in range(len(text) - n + 1))
    return frozenset(zlib.crc32(g.encode("utf-8")) for g in grams if g)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def near_duplicate_pairs(texts: Sequence[str], threshold: float = NEAR_THRESHOLD) -> list[tuple[int, int, float]]:
    """(i, j, J) for i < j with J(texts[i], texts[j]) >= threshold, sorted. Pass normalized,
    distinct texts: equal ones are exact duplicates, reported separately."""
    sets = [shingles(t) for t in texts]
    signatures = [_signature(s) for s in sets]
    rows = NUM_PERM // BANDS
    candidates: set[tuple[int, int]] = set()
    for band in range(BANDS):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, sig in enumerate(signatures):
            if sets[i]:
                buckets[sig[band * rows:(band + 1) * rows].tobytes()].append(i)
        for ids in buckets.values():
            candidates.update(combinations(ids, 2))
    scored = ((i, j, jaccard(sets[i], sets[j])) for i, j in sorted(candidates))
    return [(i, j, round(s, 4)) for i, j, s in scored if s >= threshold]


def _signature(s: frozenset[int]) -> np.ndarray:
    """MinHash signature (NUM_PERM,): min over x in s of (a*x + b) mod p, per hash function."""
    if not s:
        return np.zeros(NUM_PERM, dtype=np.uint64)
    x = np.fromiter(s, dtype=np.uint64, count=len(s)) % _PRIME
    return ((x[:, None] * _A + _B) % _PRIME).min(axis=0)

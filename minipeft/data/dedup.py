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
a signature whose entries agree with probability J; the signature is cut into b bands of r rows,
and texts sharing a band are candidates: P(candidate) = 1 - (1 - J^r)^b. The bands follow the
threshold t (band_rows): the most rows per band (the fewest dissimilar candidates) that still
miss a pair at J = t with probability <= MISS = 1e-6; at the default 0.8 that is 32 bands of 4
rows (misses 5e-8), at 0.5, 64 bands of 2. Fixed bands would not do: 32 x 4 finds a pair at
J = 0.5 with probability 0.87 only, at 0.3 with 0.23, so a lowered --near-threshold would list a
fraction of its pairs. Below about t = 0.1 no banding is that sure and all pairs are compared.
The price of a low threshold is time: with 1 row per band most pairs of texts sharing a few
n-grams become candidates (seconds for thousands of texts at 0.5, minutes at 0.3).
Every candidate is then verified with the exact J above, so no pair is reported below the threshold.

Prompts are near duplicates by their question_key, the prompt without its system turn: a shared
system prompt says nothing about whether two questions are the same. (A shared instruction
template still counts: its examples are near duplicates when what differs is short beside it.)
"""
from __future__ import annotations

import unicodedata
import zlib
from collections import defaultdict
from itertools import combinations
from typing import Optional, Sequence

import numpy as np

from .formats import Example

NGRAM = 5
NEAR_THRESHOLD = 0.8
NUM_PERM = 128
MISS = 1e-6  # the largest chance of missing a pair at exactly the threshold (band_rows)
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
    shared = len(a & b)  # |a | b| = |a| + |b| - |a & b|: one set built per pair, not two
    return shared / (len(a) + len(b) - shared) if a or b else 0.0


def near_duplicate_pairs(texts: Sequence[str], threshold: float = NEAR_THRESHOLD) -> list[tuple[int, int, float]]:
    """(i, j, J) for i < j with J(texts[i], texts[j]) >= threshold, sorted. Pass normalized,
    distinct texts: equal ones are exact duplicates, reported separately."""
    sets = [shingles(t) for t in texts]
    rows = band_rows(threshold)
    if rows is None:  # a threshold so low that banding would miss pairs: every pair is a candidate
        candidates = set(combinations([i for i, s in enumerate(sets) if s], 2))
    else:
        candidates = _lsh_candidates(sets, rows)
    scored = ((i, j, jaccard(sets[i], sets[j])) for i, j in sorted(candidates))
    return [(i, j, round(s, 4)) for i, j, s in scored if s >= threshold]


def band_rows(threshold: float) -> Optional[int]:
    """Rows per LSH band for `threshold`: the most whose bands, NUM_PERM // rows of them, miss a
    pair of similarity `threshold` with probability (1 - t^rows)^bands <= MISS; None if none does."""
    fits = [r for r in range(1, NUM_PERM + 1) if (1 - threshold ** r) ** (NUM_PERM // r) <= MISS]
    return max(fits, default=None)


def _lsh_candidates(sets: list[frozenset[int]], rows: int) -> set[tuple[int, int]]:
    """Pairs (i < j) of non-empty sets whose MinHash signatures agree on a whole band of `rows`."""
    signatures = [_signature(s) for s in sets]
    candidates: set[tuple[int, int]] = set()
    for band in range(NUM_PERM // rows):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, sig in enumerate(signatures):
            if sets[i]:
                buckets[sig[band * rows:(band + 1) * rows].tobytes()].append(i)
        for ids in buckets.values():
            candidates.update(combinations(ids, 2))
    return candidates


def _signature(s: frozenset[int]) -> np.ndarray:
    """MinHash signature (NUM_PERM,): min over x in s of (a*x + b) mod p, per hash function."""
    if not s:
        return np.zeros(NUM_PERM, dtype=np.uint64)
    x = np.fromiter(s, dtype=np.uint64, count=len(s)) % _PRIME
    return ((x[:, None] * _A + _B) % _PRIME).min(axis=0)

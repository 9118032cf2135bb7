"""Near duplicates (minipeft/data/dedup.py, simjoin.py) against brute force: every pair's Jaccard
similarity computed directly on Python sets, no filter. Prefix filtering is exact, so the pair
lists must be equal, at every threshold, on data with many pairs near each threshold."""
from __future__ import annotations

import random
from itertools import combinations

import pytest

from minipeft.data import simjoin
from minipeft.data.dedup import near_duplicate_pairs

THRESHOLDS = [1.0, 0.9, 0.8, 2 / 3, 0.5, 0.4, 1 / 3, 0.3, 0.1, 1e-6]


def brute_force(sets, threshold):
    out = []
    for i, j in combinations(range(len(sets)), 2):
        a, b = sets[i], sets[j]
        if a and b:
            similarity = len(a & b) / len(a | b)
            if similarity >= threshold:
                out.append((i, j, similarity))
    return out


def grams(text, n=5):
    return {text[i:i + n] for i in range(len(text) - n + 1)} or ({text} if text else set())


def family_texts(rng, families=12, copies=6):
    """Rewrites of a few base texts, some words changed each: pairs at every similarity, plus the
    edge cases: empty, shorter than the 5-gram, equal texts, and texts with equal 5-gram sets."""
    words = "ab abc cab bca ca bb a c abca".split()
    texts = ["", "ab", "abc", "abc", "aaaaaaa", "aaaaaa", "abcab", "xyzzy"]
    for _ in range(families):
        base = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        for _ in range(copies):
            copy = base[:]
            for _ in range(rng.randint(0, 4)):
                copy[rng.randrange(len(copy))] = rng.choice(words)
            texts.append(" ".join(copy))
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_near_duplicate_pairs_equal_brute_force(seed, threshold):
    texts = family_texts(random.Random(seed))
    expected = [(i, j, round(s, 4)) for i, j, s in brute_force([grams(t) for t in texts], threshold)]
    assert near_duplicate_pairs(texts, threshold) == expected
    assert len(expected) >= 3  # the data has pairs at this threshold: the check is not vacuous


@pytest.mark.parametrize("chunk, lookahead", [(1, 1), (7, 3), (10**9, 64)])  # chunks of one probe row .. all
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_jaccard_pairs_equal_brute_force_on_random_sets(monkeypatch, chunk, lookahead, threshold):
    """Small universe (ties in rarity, equal similarities exactly at 1/3, 1/2, 2/3), sizes 0-30."""
    monkeypatch.setattr(simjoin, "CHUNK", chunk)
    monkeypatch.setattr(simjoin, "LOOKAHEAD", lookahead)
    rng = random.Random(threshold)
    base = [frozenset(rng.sample(range(40), rng.randint(1, 30))) for _ in range(25)]
    sets = [frozenset(rng.sample(sorted(b), max(0, len(b) - rng.randint(0, 3)))) | {rng.randrange(40)}
            for b in base] + base + [frozenset(), frozenset(), base[0]]
    assert simjoin.jaccard_pairs(sets, threshold) == brute_force(sets, threshold)


def test_similarity_exactly_at_the_threshold_is_kept():
    """|a ∩ b| / |a ∪ b| = 3/9, 2/6 and 1/3 all give the float 1/3: none is lost to the bounds."""
    sets = [frozenset({1, 2, 3, 4, 5, 6}), frozenset({4, 5, 6, 7, 8, 9}), frozenset({1, 2}), frozenset({2, 12})]
    assert [(i, j) for i, j, _ in simjoin.jaccard_pairs(sets, 1 / 3)] == \
        [(i, j) for i, j, _ in brute_force(sets, 1 / 3)] == [(0, 1), (0, 2), (2, 3)]


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5, float("nan")])
def test_a_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(ValueError, match=r"Jaccard similarity in \(0, 1\]"):
        near_duplicate_pairs(["a b c d e f", "a b c d e g"], threshold)

"""Every pair of sets with Jaccard similarity >= t, exactly: prefix filtering (AllPairs, Bayardo et
al. 2007; PPJoin's positional filter, Xiao et al. 2008), then the exact J of each candidate.

    J(a, b) = |a ∩ b| / |a ∪ b| >= t   <=>   o = |a ∩ b| >= t / (1 + t) * (|a| + |b|)

Order the elements by a global order (rarest first, so that few sets share a prefix) and sort
each set by it. Prefix lemma: if |a ∩ b| >= o, the first |a| - o + 1 elements of a and the first
|b| - o + 1 of b share an element. (Let w be the first common element in the order: the o common
ones are w or after it, so w stands at most o - 1 places from the end of either set.)
Sets are processed by size, each probing the ones before it, so |b| <= |a|; J >= t then bounds

    o >= t |a|              (|a ∪ b| >= |a|): a's probe prefix of |a| - ceil(t |a|) + 1
    o >= 2t / (1 + t) |b|   (|a| >= |b|):     b's indexed prefix of |b| - ceil(2t/(1+t) |b|) + 1
    t |a| <= |b|            (o <= |b|):       the size filter

so no pair with J >= t shares no prefix element: none is missed, at any t in (0, 1]. Positional
filter: with the pair's c prefix matches, the last at 0-based places i in a and j in b, every
common element ranked before it is a match too (it lies in both prefixes), so
o <= c + min(|a| - 1 - i, |b| - 1 - j); pairs where that is below t/(1+t) (|a| + |b|) are
dropped. The survivors get the exact J (_verify). All of it runs in numpy over (set, element,
place) rows, in chunks of probing sets, with one Python step per probing set, not per pair.
Bounds use t a hair low (1 - 1e-9): a pair whose float J rounds up to t still passes every filter.
"""
from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np

CHUNK = 4_000_000  # prefix matches expanded at once: ~200 MB of int64 work arrays
LOOKAHEAD = 64  # _verify's first look at a candidate: past the ~0.11 |b| misses that rule it out at t = 0.8


def jaccard_pairs(sets: Sequence[frozenset[int]], threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, J) for i < j with J(sets[i], sets[j]) >= threshold, sorted; empty sets pair with
    nothing. Equal to comparing all pairs (module docstring), in time near the candidates'."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a Jaccard similarity in (0, 1], got {threshold}")
    order = np.array(sorted((i for i, s in enumerate(sets) if s), key=lambda i: len(sets[i])), dtype=np.int64)
    if len(order) < 2:
        return []
    sizes = np.array([len(sets[i]) for i in order], dtype=np.int64)  # set p of the join is sets[order[p]]
    owner, rank, place = _ranked(sets, order, sizes)
    low = threshold * (1 - 1e-9)
    probe = place < (sizes - np.ceil(low * sizes) + 1)[owner]
    indexed = place < (sizes - np.ceil(2 * low / (1 + low) * sizes) + 1)[owner]
    n = len(order)
    key = rank[indexed] * n + owner[indexed]  # the index: by element, then set
    by_key = np.argsort(key, kind="stable")
    key, index_owner, index_place = key[by_key], owner[indexed][by_key], place[indexed][by_key]
    a, a_rank, a_place = owner[probe], rank[probe], place[probe]
    first = np.searchsorted(sizes, low * sizes, side="left")  # smallest set the size filter lets in
    start = np.searchsorted(key, a_rank * n + first[a])
    count = np.searchsorted(key, a_rank * n + a) - start  # sets before a (smaller) sharing the element
    ends = np.cumsum(count)
    offset = np.cumsum(sizes) - sizes  # set p's ranks are rank[offset[p]:offset[p] + sizes[p]]
    member = np.zeros(int(rank.max()) + 1, dtype=bool)  # scratch: the probing set's elements
    found = []
    lo = 0
    while lo < len(a):  # chunks of whole probing sets: a pair's matches are never split
        hi = max(int(np.searchsorted(ends, ends[lo] - count[lo] + CHUNK, side="right")), lo + 1)
        hi = int(np.searchsorted(a, a[hi - 1], side="right"))
        pa, pb, matches, last_b = _candidates(a[lo:hi], a_place[lo:hi], start[lo:hi], count[lo:hi], index_owner,
                                              index_place, sizes, low)
        found += _verify(pa, pb, matches, last_b, rank, offset, sizes, member, threshold)
        lo = hi
    pairs = []
    for p, q, similarity in found:
        i, j = int(order[p]), int(order[q])
        pairs.append((min(i, j), max(i, j), similarity))
    return sorted(pairs)


def _ranked(sets: Sequence[frozenset[int]], order: np.ndarray, sizes: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (set, element): the set's place in `order`, the element's rank in the global
    order (fewest sets first, ties by value), and its 0-based place in its set sorted by rank."""
    flat = np.fromiter(chain.from_iterable(sets[i] for i in order.tolist()), dtype=np.int64, count=int(sizes.sum()))
    values, inverse, frequency = np.unique(flat, return_inverse=True, return_counts=True)
    rank_of = np.empty(len(values), dtype=np.int64)
    rank_of[np.lexsort((values, frequency))] = np.arange(len(values))
    owner = np.repeat(np.arange(len(order), dtype=np.int64), sizes)
    rank = np.sort(owner * len(values) + rank_of[inverse.ravel()]) % len(values)  # owner order kept, ranks sorted
    place = np.arange(len(flat)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return owner, rank, place


def _candidates(a: np.ndarray, a_place: np.ndarray, start: np.ndarray, count: np.ndarray, index_owner: np.ndarray,
                index_place: np.ndarray, sizes: np.ndarray, low: float) -> tuple[np.ndarray, ...]:
    """Pairs (a, b) of join places that pass the positional filter, sorted, with their number of
    prefix matches and the place in b of the last, from probe rows whose index matches are index
    rows start .. start + count."""
    row = np.repeat(np.arange(len(a)), count)
    if not len(row):
        return (np.empty(0, dtype=np.int64),) * 4
    at = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count) + start[row]
    pa, pb = a[row], index_owner[at]
    pair = pa * len(sizes) + pb
    by_pair = np.argsort(pair, kind="stable")  # stable: a pair's matches stay in rank order
    pair = pair[by_pair]
    last = np.flatnonzero(np.append(pair[1:] != pair[:-1], True))  # each pair's last (latest-ranked) match
    matches = np.diff(np.append(-1, last))
    pa, pb = pa[by_pair][last], pb[by_pair][last]
    ia, ib = a_place[row][by_pair][last], index_place[at][by_pair][last]
    na, nb = sizes[pa], sizes[pb]
    bound = matches + np.minimum(na - 1 - ia, nb - 1 - ib)
    keep = bound >= np.ceil(low / (1 + low) * (na + nb))
    return pa[keep], pb[keep], matches[keep], ib[keep]


def _verify(pa: np.ndarray, pb: np.ndarray, matches: np.ndarray, last_b: np.ndarray, rank: np.ndarray,
            offset: np.ndarray, sizes: np.ndarray, member: np.ndarray, threshold: float
            ) -> list[tuple[int, int, float]]:
    """(a, b, J) of the candidates with J >= threshold. |a ∩ b| = matches + the elements of b after
    its last match that are in a (each is ranked after that match, so lies after it in a too):
    one lookup per such element, in a boolean mask of a's elements, per probing set a. The first
    LOOKAHEAD lookups go first: every element of b known not in a lowers the bound |a ∩ b| <= |b|
    - misses, and pairs sharing only their rarest n-grams (a template) fall below t/(1+t) (|a| + |b|)
    there, without the rest of b looked up."""
    out = []
    low = threshold * (1 - 1e-9)
    bounds = np.flatnonzero(np.diff(pa, prepend=-1, append=-1))
    for g0, g1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        p = int(pa[g0])
        elements = rank[offset[p]:offset[p] + sizes[p]]
        member[elements] = True
        b, shared = pb[g0:g1], matches[g0:g1]
        begin, rest = offset[b] + last_b[g0:g1] + 1, sizes[b] - last_b[g0:g1] - 1
        ahead = np.minimum(rest, LOOKAHEAD)
        hits = _count(member, rank, begin, ahead)
        misses = last_b[g0:g1] + 1 - shared + ahead - hits  # elements of b seen not to be in a
        keep = sizes[b] - misses >= np.ceil(low / (1 + low) * (sizes[p] + sizes[b]))
        b, shared, begin, rest, ahead = b[keep], shared[keep] + hits[keep], begin[keep], rest[keep], ahead[keep]
        shared += _count(member, rank, begin + ahead, rest - ahead)
        member[elements] = False
        similarity = shared / (sizes[p] + sizes[b] - shared)  # float64 division: as Python's int / int
        keep = np.flatnonzero(similarity >= threshold)
        out += zip([p] * len(keep), b[keep].tolist(), similarity[keep].tolist())
    return out


def _count(member: np.ndarray, rank: np.ndarray, begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """For each k, how many of rank[begin[k]:begin[k] + length[k]] are marked in `member`."""
    end = np.cumsum(length)
    if not len(end):
        return end
    at = np.arange(int(end[-1])) - np.repeat(end - length, length) + np.repeat(begin, length)
    seen = np.concatenate(([0], np.cumsum(member[rank[at]])))  # hits among the first i looked up
    return seen[end] - seen[end - length]

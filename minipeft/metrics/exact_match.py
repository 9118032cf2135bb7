"""Exact-match accuracy for generated answers: mean over pairs of [normalize(pred) == normalize(ref)].

Normalization (normalize_answer): strip both ends and collapse every whitespace run (spaces,
tabs, newlines) to one space; with ignore_case, also Unicode case-fold (str.casefold, so "Straße"
matches "STRASSE"). Nothing else is removed: punctuation and articles count, unlike SQuAD's EM.

Structured outputs: when both strings parse as a JSON object or array, they are compared as
data instead (key order and whitespace ignored, values compared exactly and case-sensitively;
true is not 1, and 1 is not 1.0, because the canonical serialisations differ). JSON scalars
such as "42" or "true" stay on the text path, so ignore_case applies to them. Parsing is strict
(parse_json): NaN, Infinity and a key given twice make a string text, not JSON data.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from ._inputs import check_same_length


def normalize_answer(text: str, ignore_case: bool = False) -> str:
    """Strip, collapse whitespace runs to one space, optionally case-fold."""
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def parse_json(text: str) -> Any:
    """`text` as strict JSON (RFC 8259), else ValueError. Python's json.loads also reads NaN, Infinity
    and -Infinity, which JSON's grammar lacks and strict parsers (JavaScript's JSON.parse) refuse, and
    keeps the last of a key given twice, where other parsers keep the first or refuse: a reply holding
    either is not the JSON a program downstream can rely on."""
    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            raise ValueError("a key given twice in one object")
        return obj

    def not_json(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, object_pairs_hook=no_repeats, parse_constant=not_json)


def _canonical_json(text: str) -> Optional[str]:
    """Canonical serialisation of a JSON object/array, or None if `text` is not one."""
    try:
        value = parse_json(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, (dict, list)):
        return None
    # dumps (not ==) because Python's == says True == 1 == 1.0, which JSON data does not mean.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def exact_match(prediction: str, reference: str, ignore_case: bool = False, compare_json: bool = True) -> bool:
    """Whether one prediction matches its reference (JSON-aware unless compare_json=False)."""
    if compare_json:
        pred_json, ref_json = _canonical_json(prediction), _canonical_json(reference)
        if pred_json is not None and ref_json is not None:
            return pred_json == ref_json
    return normalize_answer(prediction, ignore_case) == normalize_answer(reference, ignore_case)


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[str], ignore_case: bool = False,
                         compare_json: bool = True) -> float:
    """Fraction (0-1) of predictions[i] that exactly match references[i] after normalization."""
    check_same_length(predictions, references, "exact_match_accuracy")
    for i, ref in enumerate(references):
        if not isinstance(ref, str):
            raise TypeError(f"exact_match_accuracy: references[{i}] is {type(ref).__name__}, expected str")
    hits = sum(exact_match(p, r, ignore_case, compare_json) for p, r in zip(predictions, references))
    return hits / len(predictions)

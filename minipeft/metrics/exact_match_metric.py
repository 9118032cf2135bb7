"""Exact-match accuracy for generated answers: mean over pairs of [normalize(pred) == normalize(ref)].

Normalization (normalize_answer): strip both ends and collapse every whitespace run (spaces,
tabs, newlines) to one space; with ignore_case, also Unicode case-fold (str.casefold, so "Straße"
matches "STRASSE"). Nothing else is removed: punctuation and articles count, unlike SQuAD's EM.

Structured outputs: when both strings parse as a JSON object or array, they are compared as
data instead (key order and whitespace ignored, values compared exactly and case-sensitively;
true is not 1, and 1 is not 1.0, because the canonical serialisations differ). JSON scalars
such as "42" or "true" stay on the text path, so ignore_case applies to them. Parsing is strict
(parse_json): NaN, Infinity, a number beyond a double's range (1e400) and a key given twice make a
string text, not JSON data.

AnswerSet(answers) tests a prediction against many answers at once (a classification task's
labels): `prediction in AnswerSet(answers)` == any(exact_match(prediction, a) for a in answers).
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Optional, Sequence

from ._inputs import check_same_length


def normalize_answer(text: str, ignore_case: bool = False) -> str:
    """Strip, collapse whitespace runs to one space, optionally case-fold."""
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def parse_json(text: str) -> Any:
    """`text` as strict JSON (RFC 8259), else ValueError. Python's json.loads also reads NaN, Infinity
    and -Infinity, which JSON's grammar lacks and strict parsers (JavaScript's JSON.parse) refuse, and
    keeps the last of a key given twice, where other parsers keep the first or refuse: a reply holding
    either is not the JSON a program downstream can rely on. A number beyond a double's range (1e400)
    is refused too: json.loads (and JavaScript) read it as Infinity, so 1e400 and 2e400 were equal."""
    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            raise ValueError("a key given twice in one object")
        return obj

    def not_json(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    def finite(number: str) -> float:
        value = float(number)
        if math.isinf(value):
            raise ValueError(f"{number} is beyond a double's range")
        return value

    return json.loads(text, object_pairs_hook=no_repeats, parse_constant=not_json, parse_float=finite)


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


def _keys(text: str, ignore_case: bool, compare_json: bool) -> tuple[Optional[str], str]:
    """(canonical JSON or None, normalized text): what exact_match compares of `text`."""
    return (_canonical_json(text) if compare_json else None), normalize_answer(text, ignore_case)


def exact_match(prediction: str, reference: str, ignore_case: bool = False, compare_json: bool = True) -> bool:
    """Whether one prediction matches its reference (JSON-aware unless compare_json=False)."""
    pred_json, pred_text = _keys(prediction, ignore_case, compare_json)
    ref_json, ref_text = _keys(reference, ignore_case, compare_json)
    if pred_json is not None and ref_json is not None:
        return pred_json == ref_json
    return pred_text == ref_text


class AnswerSet:
    """`prediction in AnswerSet(answers)`: any(exact_match(prediction, a) for a in answers), with
    each string's keys computed once (a test set's predictions against its labels: O(N), not O(N L))."""

    def __init__(self, answers: Iterable[str], ignore_case: bool = False, compare_json: bool = True):
        self.ignore_case, self.compare_json = ignore_case, compare_json
        keys = [_keys(a, ignore_case, compare_json) for a in answers]
        self._json = {j for j, _ in keys if j is not None}
        self._text = {t for _, t in keys}
        # exact_match compares a JSON prediction with a JSON answer as data only, with others as text
        self._text_of_non_json = {t for j, t in keys if j is None}

    def __contains__(self, prediction: str) -> bool:
        pred_json, pred_text = _keys(prediction, self.ignore_case, self.compare_json)
        if pred_json is None:
            return pred_text in self._text
        return pred_json in self._json or pred_text in self._text_of_non_json


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[str], ignore_case: bool = False,
                         compare_json: bool = True) -> float:
    """Fraction (0-1) of predictions[i] that exactly match references[i] after normalization."""
    check_same_length(predictions, references, "exact_match_accuracy")
    for i, ref in enumerate(references):
        if not isinstance(ref, str):
            raise TypeError(f"exact_match_accuracy: references[{i}] is {type(ref).__name__}, expected str")
    hits = sum(exact_match(p, r, ignore_case, compare_json) for p, r in zip(predictions, references))
    return hits / len(predictions)

"""Validation of the (hypotheses, references) pairs shared by BLEU, ROUGE and exact match.

Convention: references[i] holds the reference(s) of hypotheses[i], either one string or a
non-empty list of strings (several references, possibly a different number per hypothesis).
This is the transpose of sacrebleu's layout (one list per reference *set*), and it is what
Hugging Face `evaluate` uses.
"""
from __future__ import annotations

from typing import Sequence, Union

References = Sequence[Union[str, Sequence[str]]]


def check_same_length(hypotheses: Sequence[str], references: Sequence[object], what: str) -> None:
    """Raise ValueError unless both sides are non-empty sequences of equal length."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError(f"{what}: expected lists of strings, got a bare string; wrap it in a list")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{what}: got {len(hypotheses)} hypotheses but {len(references)} references; references[i] "
            "must hold the reference(s) of hypotheses[i] (sacrebleu's layout is the transpose)")
    if not hypotheses:
        raise ValueError(f"{what}: the corpus is empty (0 hypotheses)")
    for i, hyp in enumerate(hypotheses):
        if not isinstance(hyp, str):
            raise TypeError(f"{what}: hypotheses[{i}] is {type(hyp).__name__}, expected str")


def as_reference_lists(hypotheses: Sequence[str], references: References, what: str) -> list[list[str]]:
    """Normalise references to one non-empty list of strings per hypothesis."""
    check_same_length(hypotheses, references, what)
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"{what}: references[{i}] is empty; every hypothesis needs at least one reference")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"{what}: references[{i}][{j}] is {type(ref).__name__}, expected str")
        out.append(refs)
    return out

"""Which examples an optimizer step sees, and how its loss is normalized.

One optimizer step consumes a global batch of G = batch_size x gradient_accumulation_steps x
world_size examples, taken in a (seed, epoch)-determined order (epoch_order). Its loss is

    L = sum over the G examples' supervised tokens of -log p(token)  /  N_tokens(G)

so every micro-batch contributes (its NLL sum) / N_tokens(G) (supervised_tokens) and the gradient
is the same whatever the split into micro-batches or processes (micro_batches). Averaging
per-micro-batch means instead would weight a token by 1/len(its micro-batch): the
gradient-accumulation bug that unsloth found in transformers (tests/test_trainer.py checks
bs=2 x accum=4 == bs=8 on ragged data).
"""
from __future__ import annotations

import hashlib
import operator
from array import array
from typing import Any, Iterable, Sequence

import torch

from .batching import IGNORE_INDEX, PackedRow, pack

Rendered = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels)


def _ints(seq: Any) -> list[int] | None:
    """`seq` (a list or tuple of ints, or a 1-D integer tensor or array) as a list of ints, else None."""
    if hasattr(seq, "tolist") and getattr(seq, "ndim", 1) == 1:  # torch and numpy, not 0-d
        seq = seq.tolist()
    if not isinstance(seq, (list, tuple)) or any(isinstance(t, bool) for t in seq):
        return None
    try:  # numpy's integers too; a float (3.0) is no token id
        return [t if type(t) is int else operator.index(t) for t in seq]
    except TypeError:
        return None


def checked_examples(examples: Iterable[Any], name: str, vocab_size: int, max_length: int) -> list[Rendered]:
    """`examples` as (input_ids, labels) lists of ints, once each is checked: a pair of equal,
    non-empty lengths of at most max_length tokens, ids in [0, vocab_size), labels -100 or in
    [0, vocab_size). Else a ValueError naming name[i] and what was expected: found mid-run, a bad
    example failed as an embedding's "index out of range" or a batch-relative index."""
    out: list[Rendered] = []
    for i, example in enumerate(examples):
        where = f"{name}[{i}]"
        if isinstance(example, dict):
            raise ValueError(f"{where} is a dict (keys {sorted(map(str, example))}): expected an (input_ids, labels) "
                             "pair, as templates.render returns; e.g. (ex['input_ids'], ex['labels'])")
        pair = list(example) if isinstance(example, (list, tuple)) and len(example) == 2 else None
        ids, labels = (_ints(pair[0]), _ints(pair[1])) if pair else (None, None)
        if ids is None or labels is None:
            raise ValueError(f"{where}: expected an (input_ids, labels) pair of integer lists, as templates.render "
                             f"returns; got {type(example).__name__} {str(example)[:60]}")
        if not ids or len(ids) != len(labels):
            raise ValueError(f"{where}: input_ids has {len(ids)} tokens and labels {len(labels)}: expected the same, "
                             "non-zero number")
        if len(ids) > max_length:
            raise ValueError(f"{where} has {len(ids)} tokens > max_length {max_length}: render with max_length "
                             "(templates.render drops or truncates it), leave it out, or raise max_length")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        bad_label = next((t for t in labels if t != IGNORE_INDEX and not 0 <= t < vocab_size), None)
        if bad is not None or bad_label is not None:
            what = f"input id {bad}" if bad is not None else f"label {bad_label}"
            raise ValueError(f"{where}: {what} is outside the model's vocabulary [0, {vocab_size})"
                             + (f" (and not {IGNORE_INDEX}, the ignored label)" if bad is None else "")
                             + ": was it encoded by another tokenizer?")
        out.append((ids, labels))
    return out


def fingerprint(examples: Sequence[Rendered]) -> dict[str, Any]:
    """{"examples": their number, "sha256": of their ids and labels in order}: what a checkpoint
    records of the data it was trained on, so that a resume on other data is refused, not mixed in."""
    digest = hashlib.sha256()
    for ids, labels in examples:
        digest.update(array("q", [len(ids), *ids, *labels]).tobytes())
    return {"examples": len(examples), "sha256": digest.hexdigest()}


def supervised_tokens(examples: Sequence[Rendered | PackedRow]) -> int:
    """Tokens the loss sees: labels after the one-step shift that are not -100 (a packed row's
    examples each start with -100 already: the same count as the examples apart)."""
    return sum(sum(1 for t in ex[1][1:] if t != -100) for ex in examples)


def pack_shuffled(examples: Sequence[Rendered], max_length: int, seed: int) -> list[PackedRow]:
    """The examples packed into rows of at most max_length tokens (batching.pack), in an order
    drawn from seed: a file's neighbours (often alike) do not always share a row. Packed once;
    each epoch then shuffles the rows."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return pack([examples[i] for i in order], max_length)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n training examples (or packed rows) in `epoch`: a permutation drawn from
    seed + epoch alone, so a resumed run steps through the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def micro_batches(batch: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's slice of each micro-batch of the global batch `batch`: consecutive runs of
    batch_size x world examples, each split between the ranks in rank order (the last ones may be
    short, or empty on some ranks)."""
    size = batch_size * world
    micro = [batch[i:i + size] for i in range(0, len(batch), size)]
    return [m[rank * batch_size:(rank + 1) * batch_size] for m in micro]

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

from typing import Sequence

import torch

from .batching import PackedRow, pack

Rendered = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels)


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

"""Which parameters train, and how many: PEFT's trainable-parameters line, full fine-tuning (every
parameter), and a block that gives a model's trainability back when it fails."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .linear4bit import Linear4bit
from .model import Transformer


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts as its unquantized in x out elements
    (it is stored as packed bytes, which numel() would count at half, or as buffers not at all)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    """PEFT's line, character for character."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def full_finetune(model: Transformer) -> Transformer:
    """Full fine-tuning: no adapter, every parameter trains (the baseline every method is compared to)."""
    return model.requires_grad_(True)


@contextlib.contextmanager
def trainability_restored_on_error(model: nn.Module) -> Iterator[None]:
    """On an error inside the block, each parameter of `model` gets its requires_grad back: a refused
    get_peft_model or from_pretrained hands the caller's model back as it was, not frozen."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise

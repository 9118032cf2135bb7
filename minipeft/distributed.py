"""Data parallelism in three calls, set up from torchrun's environment (RANK, WORLD_SIZE).

Each rank computes gradients on its slice of every micro-batch, already divided by the token
count of the whole global batch, so a SUM across ranks is exactly the single-process gradient.
Without torchrun these are no-ops and the trainer runs as one process.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as tdist


def init() -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); no-op alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def sum_gradients(params: Sequence[torch.Tensor], *extra: torch.Tensor) -> None:
    """Sum every parameter's .grad, and the tensors `extra` in place, across ranks.

    Every rank issues the same collectives whatever it computed: a rank whose slice of the last
    global batch was empty (an uneven dataset) has no .grad yet and contributes zeros. A gradient
    that no rank produced stays None, so AdamW skips that parameter as it does in one process."""
    if not tdist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    produced = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    for t in [*grads, produced, *extra]:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    for p, g, n in zip(params, grads, produced.tolist()):
        p.grad = g if n else None


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()

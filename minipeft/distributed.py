"""Data parallelism in three calls, set up from torchrun's environment (RANK, WORLD_SIZE).

Each rank computes gradients on its slice of every micro-batch, already divided by the token
count of the whole global batch, so a SUM across ranks is exactly the single-process gradient.
Without torchrun these are no-ops and the trainer runs as one process.
"""
from __future__ import annotations

import os

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


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    if tdist.is_initialized():
        for t in tensors:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()

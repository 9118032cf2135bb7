"""Data parallelism in a few calls, set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Each rank computes gradients on its slice of every micro-batch, already divided by the token
count of the whole global batch, so a SUM across ranks is exactly the single-process gradient.
GPUs: one per process, cuda:LOCAL_RANK, summed over NCCL; CPU processes sum over gloo.
Without torchrun these are no-ops and the trainer runs as one process.
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as tdist
from torch import nn

DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")  # what a job's `device` setting may say


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _local_gpu(environ: Mapping[str, str]) -> int:
    """The index of this rank's own GPU: LOCAL_RANK, or 0 where CUDA_VISIBLE_DEVICES names one
    device (a launcher that shows each rank only its own GPU, as Slurm's --gpus-per-task=1: it is
    cuda:0 there, whatever LOCAL_RANK says)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and len([d for d in visible.split(",") if d.strip()]) == 1:
        return 0
    return int(environ.get("LOCAL_RANK", 0))


def use_device(requested: str = "auto") -> torch.device:
    """The device this process computes on, made CUDA's current one (Triton kernels and NCCL use it).

    requested: "auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda" (under torchrun
    cuda:LOCAL_RANK, one GPU per process; cuda:0 where CUDA_VISIBLE_DEVICES shows the process one
    GPU) or "cuda:N" (a single process only). ValueError, naming the setting, for a device this
    machine or launch cannot give.
    """
    if not DEVICES.fullmatch(requested):
        raise ValueError(f"device={requested!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={requested!r}: torch sees no GPU (torch.cuda.is_available() is False: no GPU, "
                         f"or a CPU build of torch {torch.__version__}); use device='cpu' or 'auto'")
    device = torch.device(requested)
    if device.index is None:
        device = torch.device("cuda", _local_gpu(os.environ))
    elif _env("WORLD_SIZE", 1) > 1:
        raise ValueError(f"device={requested!r} puts every one of the {_env('WORLD_SIZE', 1)} processes on one GPU; "
                         "use device='cuda' (or 'auto'): each process takes cuda:LOCAL_RANK")
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"device={requested!r}: {device} does not exist; this machine has "
                         f"{torch.cuda.device_count()} GPU(s) (torchrun --nproc_per_node at most that many)")
    torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (it sets WORLD_SIZE), NCCL between GPUs and gloo
    between CPU processes: the backend follows the device the ranks compute on. A group of one
    (--nproc_per_node 1) runs the same collectives; without torchrun, no-op."""
    if "WORLD_SIZE" in os.environ and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def check_local_device(model: nn.Module, environ: Mapping[str, str] = os.environ) -> torch.device:
    """The device `model` computes on, its first parameter's. Under torchrun (WORLD_SIZE > 1, in
    `environ`) every parameter and buffer must be on this rank's own device, the one use_device
    gives: cuda:LOCAL_RANK for a GPU rank (cuda:0 where CUDA_VISIBLE_DEVICES shows it one GPU). A
    model left on cuda:0 on every rank runs them all on one GPU, or NCCL fails or hangs on two ranks
    of one device; a tensor left elsewhere (a buffer, a later parameter) fails mid-step. CPU ranks
    (gloo) share the host: all on the CPU. ValueError naming RANK, LOCAL_RANK, the first tensor off
    the device, and where it is."""
    device = next(model.parameters()).device
    if int(environ.get("WORLD_SIZE", 1)) <= 1:
        return device
    own = torch.device("cuda", _local_gpu(environ)) if device.type == "cuda" else device
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.device != own:
            why = "its own GPU, cuda:LOCAL_RANK" if own.type == "cuda" else "one device, its first parameter's"
            raise ValueError(f"rank {environ.get('RANK', '?')} (LOCAL_RANK={environ.get('LOCAL_RANK', 0)}): {name} is "
                             f"on {t.device}, but under torchrun each process trains on {why} (here {own}); move "
                             f"the whole model there before building the Trainer: "
                             f"model.to(minipeft.distributed.use_device('{own.type}'))")
    return device


def join(model: nn.Module) -> torch.device:
    """The device `model` computes on, checked (check_local_device), and init(device) where torchrun
    started several processes: a Trainer built from Python joins them as run_job does (a no-op once
    joined). Alone, or with --nproc_per_node 1, there is no other rank to join, and a plain process
    that merely has WORLD_SIZE=1 set starts no group."""
    device = check_local_device(model)
    if _env("WORLD_SIZE", 1) > 1:
        init(device)
    return device


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
    all_reduce_sum([*grads, produced, *extra])
    for p, g, n in zip(params, grads, produced.tolist()):
        p.grad = g if n else None


BUCKET_BYTES = 25 * 2**20  # torch DistributedDataParallel's default bucket


def buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most BUCKET_BYTES (a larger
    tensor is a bucket alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or (t.dtype, t.device) != (out[-1][0].dtype, out[-1][0].device) or size + nbytes > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


def _bucketed(tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """collective(flat), in place, on each bucket of tensors flattened into one: a LoRA model has a
    few small tensors per layer, and each collective costs tens of microseconds whatever its size.
    Alone, no-op."""
    if not tdist.is_initialized():
        return
    for bucket in buckets(tensors):
        flat = bucket[0] if len(bucket) == 1 else torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        if len(bucket) > 1:
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor across ranks, in place, one collective per bucket rather than per tensor."""
    _bucketed(tensors, lambda flat: tdist.all_reduce(flat, op=tdist.ReduceOp.SUM))


@torch.no_grad()
def broadcast(tensors: Sequence[torch.Tensor]) -> None:
    """Give each tensor rank 0's values, in place (parameters too), one collective per bucket."""
    _bucketed(tensors, lambda flat: tdist.broadcast(flat, src=0))


def backend_is_nccl() -> bool:
    return tdist.is_initialized() and tdist.get_backend() == "nccl"


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's t (one shape and dtype on all), in rank order, on every rank; [t] alone.
    NCCL moves CUDA tensors only: t travels through this rank's GPU then."""
    if not tdist.is_initialized():
        return [t]
    moved = t.cuda() if backend_is_nccl() else t
    out = [torch.empty_like(moved) for _ in range(world_size())]
    tdist.all_gather(out, moved)
    return [o.to(t.device) for o in out]


def finish() -> None:
    """Leave the process group, if any: NCCL warns at exit of one never destroyed, whose pending
    operations may not have finished."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()

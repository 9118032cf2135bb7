"""Pieces shared by the Triton kernels of minipeft: tile scheduling, the dot product, autotune configs.

The kernels follow the Triton tutorial 03-matrix-multiplication: a 1-D grid of programs, each owning one
BLOCK_M x BLOCK_N output tile, launched in "grouped" order so GROUP_M consecutive programs reuse the same
columns of the weight from L2. Tested through the kernels that use them (tests/test_kernels_*.py).

Interpreter (TRITON_INTERPRET=1, CPU): `@triton.jit` reads the flag when a kernel module is *imported*, so
it must be set before `minipeft.kernels.lora` / `.nf4` are first imported. Triton 3.9's interpreter keeps
bfloat16 as raw uint16 bits and `tl.dot` multiplies those bits (triton-lang/triton#11584), so under the
interpreter `mma` upcasts its operands to float32 first. That is exact: a bf16 x bf16 product has at most
16 significant bits and fits a float32, and the tensor cores accumulate in float32 too. The interpreter
also truncates float32 -> bfloat16 casts, so kernels cast through `to_dtype`, which rounds like the GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Read once, at import, exactly like @triton.jit does for the kernels defined after this import.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: tiles are visited GROUP_M rows at a time, column by column, so a
    group of programs running together shares its weight columns in L2 (tutorial 03, "L2 cache")."""
    pid = tl.program_id(axis=0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in float32. UPCAST is the interpreter work-around described above."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def to_dtype(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even. Triton 3.9's interpreter truncates float32 -> bfloat16, so
    there the rounding is done on the bits: add 0x7FFF plus the lowest kept bit, drop the low 16 bits
    (exact RTNE for finite values, overflow to inf included), which is what the GPU's cvt.rn does."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots follow PyTorch's own switch (torch.backends.cuda.matmul.allow_tf32, off by default),
    so the kernel and the eager twin round the same way; for 16-bit inputs the choice is ignored."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def rank_pad(r: int) -> int:
    """The LoRA rank padded to a tl.dot-legal block: a power of two, at least 16 (the tensor-core minimum)."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: the next power of two, so a training run with varying
    sequence lengths tunes once per bucket instead of once per distinct M."""
    return triton.next_power_of_2(m)


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Modest GPU configs, tried among those of M's regime (by BLOCK_M, see prune_configs). Decode (M <= 16,
# BLOCK_M = 16) is memory bound on the weight: one row tile covers all tokens, so the grid runs over N only
# and each program streams its own weight rows, the GEMV-shaped path; narrow BLOCK_N keeps enough programs
# to fill the SMs, long BLOCK_K keeps each program's reads long. No 128 x 256 tile: the epilogue holds the
# LoRA product next to the accumulator, two float32 tiles in registers.
MATMUL_CONFIGS = [
    _cfg(16, 32, 256, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 4, 3),   # BLOCK_M 16: M <= 16
    _cfg(32, 64, 128, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),     # 32..64: M <= 256
    _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),                             # 64..128: M > 256
]
# One config under the interpreter: tiles smaller than the test shapes, so every edge mask and the
# grouped ordering (a partial last group) run; autotuning there would only time numpy.
INTERPRETER_CONFIG = _cfg(32, 32, 32, 1, 1, group_m=2)


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _shared_mem(config: triton.Config, element_size: int, r_pad: int) -> int:
    """Pipelined operand tiles (X, W, A) of one program, in bytes: a lower bound of its shared memory."""
    bm, bn, bk = (config.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * bk * (bm + bn + r_pad) * element_size


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The configs of M's regime whose operand tiles fit the GPU's shared memory (float32 tiles are twice
    as large; else the smallest of the regime); under the interpreter, INTERPRETER_CONFIG."""
    if INTERPRET:
        return [INTERPRETER_CONFIG]
    m, x = named_args["M"], named_args["x_ptr"]
    low, high = (16, 16) if m <= 16 else (32, 64) if m <= 256 else (64, 128)
    regime = [c for c in configs if low <= c.kwargs["BLOCK_M"] <= high]
    size = lambda c: _shared_mem(c, x.element_size(), kwargs["R_PAD"])
    fits = [c for c in regime if size(c) <= _max_shared_mem(x.device.index)]
    return fits or [min(regime, key=size)]


# The kernels compute element offsets (row * stride + col, an NF4 weight's flat index) in int32, Triton's
# type for program ids, aranges and integer arguments below 2**31, and int32 wraps silently: a load or store
# past it would land elsewhere. 64-bit offsets would make the per-weight NF4 index arithmetic of the fused
# K loop 64-bit too (not shown free on a GPU), and switching to them per launch adds a constexpr that every
# caller must pass (minipeft.kernels.aot too); so operands reaching past MAX_SPAN are refused instead. The
# margin below 2**31 covers indices up to a block past an operand's end (a last partial tile's rows, the
# dequantization kernel's last block; blocks have at most 1024 elements), computed before masking.
# The sizes are int32 too, and so is counting along them (the K loop runs to K + BLOCK_K - 1): an operand
# expanded along a dimension (stride 0) spans one element however long the dimension, so sizes are held to
# MAX_SPAN separately (x, w and A all expanded along K = 2**31 - 1 left the K loop empty: out = 0).
MAX_SPAN = 2**31 - 2**16
_TORCH_PATH = "use the PyTorch path (minipeft.functional.use_kernels('torch'))"


def check_span(name: str, span: int) -> None:
    """Raise a ValueError naming the operand when `span`, the elements from its first to one past its last
    in memory, exceeds MAX_SPAN."""
    if span > MAX_SPAN:
        raise ValueError(f"{name}: its elements span {span} in memory, more than the kernels' int32 offsets allow "
                         f"({MAX_SPAN}); {_TORCH_PATH}")


def check_operand(name: str, t, shape: tuple, dtype, device: torch.device) -> None:
    """Raise a ValueError naming the operand when its shape, dtype (unless None) or device is not the
    expected one, when it spans more than MAX_SPAN elements: 1 + sum((size - 1) * stride), which is its
    element count when contiguous, more for a strided view, 1 for an expanded one (stride 0), or when one
    of its dimensions is longer than MAX_SPAN, whatever its stride."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if all(shape):  # an empty operand is never read
        check_span(name, 1 + sum((size - 1) * t.stride(dim) for dim, size in enumerate(shape)))
        if max(shape) > MAX_SPAN:
            raise ValueError(f"{name}: a dimension of {max(shape)} elements (shape {tuple(shape)}), more than the "
                             f"kernels' int32 indices allow ({MAX_SPAN}); {_TORCH_PATH}")

"""The LoRA and QLoRA linear maps in plain PyTorch (the specification) and the switch to the Triton kernels.

    lora_linear(x, W, b, A, B, s)  = x W^T + b + s * (D(x) A^T) B^T
    nf4_lora_linear(x, Wq, ...)    = the same with W = dequantize_nf4(Wq, x.dtype) (QLoRA)
    dequantize_nf4(Wq, dtype)      = minipeft.nf4.dequantize_nf4, or its bit-exact kernel
    x (..., K) any leading dims,  W (N, K),  b (N,),  A = lora_A (r, K),  B = lora_B (N, r),
    s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)),  D = dropout on the LoRA branch's input only
    (PEFT: lora_B(lora_A(dropout(x))) * scaling). The LoRA branch runs in lora_A's dtype, is added to the
    base output in the wider dtype and the sum cast to the output's, as PEFT does when it keeps float32
    adapters under a 16-bit base.

Dropout: the mask is drawn here, by torch (bernoulli_, so torch.manual_seed reproduces it), and handed to
either path as a bool tensor of x's shape; the kernel does not generate it. Why: (1) the eager twin and
the kernel then see the same mask by construction, so they are comparable at any dropout rate; (2) an
in-kernel counter-based RNG would recompute the mask of each X tile in every column tile of the GEMM,
integer work on the CUDA cores of the same order as the tensor-core work it rides on; (3) the mask costs
1 byte per element of x, read by the kernel next to the X tile it already loads, and kept for the
backward, where PEFT keeps its dropout mask and dropped input too. Kept values are scaled by 1 / (1 - p)
(inverted dropout, as nn.Dropout).

Which path runs (one switch): `use_kernels(mode)`, as a call or a context manager, else the environment
variable MINIPEFT_KERNELS (set but empty counts as unset), else "auto":
    auto   - Triton when the tensors are on CUDA, triton imports and the operands are supported (x and W
             in one float dtype, adapters in it or float32, 1 <= r <= 128, no torch.autocast for x's
             device); otherwise the PyTorch path (which follows autocast).
    triton - always the kernels; unsupported operands raise. CPU tensors run on Triton's interpreter,
             which needs TRITON_INTERPRET=1: exported, or minipeft.kernels.triton_interpreter() around
             the first import of the kernels and the calls.
    torch  - always PyTorch.
On the PyTorch path, a frozen W with adapters of its dtype and nothing dropped runs as one matmul with
the merged weight W + s B A (minipeft.lora_merged: same map, fewer passes); anything else runs the twin.
Tested in tests/test_kernels_lora.py and tests/test_kernels_nf4.py (twin vs kernels vs float64 autograd).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from . import nf4
from .lora_merged import can_merge, lora_linear_merged
from .nf4 import NF4Tensor

MODES = ("auto", "triton", "torch")
ENV_VAR = "MINIPEFT_KERNELS"
_override: Optional[str] = None


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: expected one of {'|'.join(MODES)}, got {mode!r}")
    return mode


class use_kernels:
    """Force the kernel path: use_kernels("triton" | "torch" | "auto").

    A plain call sets the mode for the process; `with use_kernels(mode):` restores the previous one on exit.
    It takes precedence over the MINIPEFT_KERNELS environment variable.
    """

    def __init__(self, mode: str):
        global _override
        self._previous = _override
        _override = _check_mode(mode, "use_kernels")

    def __enter__(self) -> "use_kernels":
        return self

    def __exit__(self, *exc) -> None:
        global _override
        _override = self._previous


def kernel_mode() -> str:
    """The mode in force: use_kernels' override, else $MINIPEFT_KERNELS, else "auto"."""
    if _override is not None:
        return _override
    # Set but empty (MINIPEFT_KERNELS= in a shell or a job file) means unset, as for most variables.
    return _check_mode(os.environ.get(ENV_VAR) or "auto", f"environment variable {ENV_VAR}")


def _kernels(name: str) -> ModuleType:
    """minipeft.kernels.<name>, imported on first use: triton is only imported when a kernel may run."""
    return importlib.import_module(f"minipeft.kernels.{name}")


@functools.lru_cache(maxsize=None)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_problem(is_cuda: bool) -> Optional[str]:
    """Why no kernel can run on this device, or None."""
    if not _have_triton():
        return "triton is not installed"
    if not is_cuda and not _kernels("common").INTERPRET:
        return ("the tensors are on the CPU, where kernels run only on Triton's interpreter: set "
                "TRITON_INTERPRET=1 before minipeft.kernels is first imported (minipeft.kernels.triton_interpreter)")
    return None


def _lora_problem(x: torch.Tensor, weight_dtype: torch.dtype, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                  lora_B: torch.Tensor) -> Optional[str]:
    """Why the LoRA kernel cannot take these operands, or None when it can."""
    problem = _triton_problem(x.is_cuda)
    if problem is not None:
        return problem
    supported = _kernels("common").SUPPORTED_DTYPES
    if x.dtype not in supported or weight_dtype != x.dtype:
        return f"x and the weight must share one of {supported}, got {x.dtype} and {weight_dtype}"
    if bias is not None and bias.dtype != x.dtype:
        return f"the bias must have x's dtype {x.dtype}, got {bias.dtype}"
    if lora_A.dtype not in (x.dtype, torch.float32) or lora_B.dtype != lora_A.dtype:
        return f"lora_A and lora_B must share x's dtype or float32, got {lora_A.dtype} and {lora_B.dtype}"
    max_rank = _kernels("lora").MAX_RANK
    if lora_A.shape[0] < 1:
        return f"rank {lora_A.shape[0]}: the kernels need a rank of at least 1"
    if lora_A.shape[0] > max_rank:
        return f"rank {lora_A.shape[0]} is above the kernels' limit {max_rank}"
    (n, r), k = lora_B.shape, lora_A.shape[1]
    m = x.numel() // max(k, 1)
    too_large = _past_int32("an operand", max(m * k, m * n, n * k, m * r))
    if too_large:
        return too_large
    # The kernels compute in the operands' dtypes; autocast's would be silently ignored.
    if torch.is_autocast_enabled(x.device.type):
        return (f"torch.autocast is on for {x.device.type} (dtype {torch.get_autocast_dtype(x.device.type)}), "
                "which the kernels do not follow")
    return None


def _nf4_problem(q: NF4Tensor) -> Optional[str]:
    """Why the dequantization kernel cannot take q, or None when it can."""
    return _triton_problem(q.data.is_cuda) or _past_int32("a weight", q.numel())


def _past_int32(what: str, n: int) -> Optional[str]:
    """Why `what`, of n elements, is past the kernels' int32 offsets (common.MAX_SPAN), or None: auto
    dispatch then takes PyTorch rather than meet the kernels' refusal."""
    limit = _kernels("common").MAX_SPAN
    return f"{what} of {n} elements is past the kernels' int32 offsets ({limit})" if n > limit else None


def _use_triton(is_cuda: bool, problem) -> bool:
    """The dispatch rule of the module docstring; `problem()` says why the kernel cannot run, or None."""
    mode = kernel_mode()
    if mode == "torch" or (mode == "auto" and not is_cuda):
        return False
    reason = problem()
    if reason is not None and mode == "triton":
        raise ValueError(f"{ENV_VAR}/use_kernels is 'triton' but the kernels cannot run: {reason}")
    return reason is None


def dropout_mask(x: torch.Tensor, p: float, training: bool) -> tuple[Optional[torch.Tensor], float]:
    """(mask, keep_scale) for inverted dropout of rate p on x: a bool mask of x's shape (True = kept,
    probability 1 - p) and 1 / (1 - p); (None, 1.0) when nothing is dropped (p == 0 or eval)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return None, 1.0
    # uint8 0/1 draws (bernoulli_ supports uint8 on every device) converted, not viewed, to bool: Inductor's CPU
    # code for a uint8 -> bool view does not compile (torch.compile of training with dropout failed).
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1.0 - p).bool()
    return mask, (1.0 / (1.0 - p) if p < 1.0 else 0.0)


def apply_dropout_mask(x: torch.Tensor, mask: Optional[torch.Tensor], keep_scale: float) -> torch.Tensor:
    """D(x) = where(mask, x * keep_scale, 0); x itself when mask is None."""
    return x if mask is None else torch.where(mask, x * keep_scale, 0.0)


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b, W = dequantize_nf4(q) in x's dtype, dequantized again in the backward (dx = g W)
    rather than kept: autograd would save every layer's W, a full-precision copy of the model, which is
    what QLoRA exists to avoid (bitsandbytes' MatMul4Bit keeps the 4-bit weight too)."""

    @staticmethod
    def forward(ctx, x, q, bias):
        ctx.q = q
        return F.linear(x, dequantize_nf4(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, g):
        dx = g @ dequantize_nf4(ctx.q, g.dtype) if ctx.needs_input_grad[0] else None
        db = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x W^T + b with W = dequantize_nf4(weight, x.dtype): x (..., K), weight (N, K) -> (..., N). W is
    formed in each pass and dropped: between forward and backward the weight stays 4-bit."""
    return _NF4Linear.apply(x, weight, bias)


def lora_linear_torch(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: Optional[torch.Tensor],
                      lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      dropout_mask: Optional[torch.Tensor] = None, keep_scale: float = 1.0) -> torch.Tensor:
    """The eager twin (the spec): add_lora(F.linear(x, W, b), ...). An NF4 W runs through nf4_linear
    (the same values, in x's dtype; W not kept for the backward)."""
    y = nf4_linear(x, weight, bias) if isinstance(weight, NF4Tensor) else F.linear(x, weight, bias)
    return add_lora(y, x, lora_A, lora_B, scaling, dropout_mask, keep_scale)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
             dropout_mask: Optional[torch.Tensor] = None, keep_scale: float = 1.0) -> torch.Tensor:
    """y + s (D(x) A^T) B^T, y the base layer's output: the branch in lora_A's dtype, the sum in the wider
    of the two, cast to y's dtype once (PEFT's order: a bfloat16 y plus a float32 branch is rounded once)."""
    x_lora = apply_dropout_mask(x.to(lora_A.dtype), dropout_mask, keep_scale)
    return (y + F.linear(F.linear(x_lora, lora_A), lora_B) * scaling).to(y.dtype)


def _lora_linear_eager(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, mask: Optional[torch.Tensor],
                       keep_scale: float) -> torch.Tensor:
    """The PyTorch path: through the merged weight when that is the same map, else the twin."""
    if can_merge(x, weight, lora_A, lora_B, mask):
        return lora_linear_merged(x, weight, bias, lora_A, lora_B, scaling)
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x W^T + b + s (D(x) A^T) B^T (module docstring), by the fused kernel or PyTorch.

    x (..., K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r) -> (..., N).
    dropout: rate p of D, applied only when training.
    """
    mask, keep_scale = dropout_mask(x, dropout, training)
    if _use_triton(x.is_cuda, lambda: _lora_problem(x, weight.dtype, bias, lora_A, lora_B)):
        return _kernels("lora").lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)
    return _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """minipeft.nf4.dequantize_nf4 (the spec), or the Triton kernel, equal to it bit for bit."""
    if _use_triton(q.data.is_cuda, lambda: _nf4_problem(q)):
        return _kernels("nf4").dequantize_nf4(q, dtype)
    return nf4.dequantize_nf4(q, dtype)


def nf4_lora_linear_torch(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                          lora_B: torch.Tensor, scaling: float, dropout_mask: Optional[torch.Tensor] = None,
                          keep_scale: float = 1.0) -> torch.Tensor:
    """The eager QLoRA twin: lora_linear_torch with W = minipeft.nf4.dequantize_nf4(weight, x.dtype)."""
    return lora_linear_torch(x, nf4.dequantize_nf4(weight, x.dtype), bias, lora_A, lora_B, scaling, dropout_mask,
                             keep_scale)


def nf4_lora_linear(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """The QLoRA linear: lora_linear with the frozen W = dequantize_nf4(weight) in x's dtype (x is in the
    compute dtype; Linear4bit casts it). weight: a 2-D NF4Tensor (N, K); the kernel path never stores W."""
    if len(weight.shape) != 2:
        raise ValueError(f"nf4_lora_linear: expected a 2-D NF4 weight (out_features, in_features), "
                         f"got shape {tuple(weight.shape)}")
    mask, keep_scale = dropout_mask(x, dropout, training)
    if _use_triton(x.is_cuda, lambda: _lora_problem(x, x.dtype, bias, lora_A, lora_B)):
        return _kernels("lora").nf4_lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)
    return _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, mask, keep_scale)  # W stays 4-bit

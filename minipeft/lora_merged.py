"""LoRA through the merged weight: one matmul where the twin runs three, for a frozen base.

    y = x Wᵀ + b + s (x Aᵀ) Bᵀ  =  x (W + s B A)ᵀ + b  =  x W'ᵀ + b
    x (M, K) (any leading dims),  W (N, K),  A (r, K),  B (N, r),  s = lora_alpha / r

Forming W' = W + s B A costs N·r·K multiply-adds, little next to the matmul's M·N·K when a batch has
M >> r rows; gone are the two thin matmuls x Aᵀ and (x Aᵀ) Bᵀ, the scaling and the sum, each a full
pass over an (M, N) tensor. Backward, with g = ∂L/∂y (M, N):

    ∂L/∂x = g W'            one matmul (W' formed again rather than kept: no memory held)
    ∂L/∂A = s (g B)ᵀ x       (r, K)
    ∂L/∂B = s ((x Aᵀ)ᵀ g)ᵀ   (N, r)
    ∂L/∂b = Σ over rows of g

W gets no gradient: this path is only for a frozen W. It also needs no dropout (the LoRA branch would
see another input than W) and x, W, A, B all float32 or all float64, with autocast off for x's device:
in a 16-bit W', each entry of a small s B A would round to W's coarse step (bfloat16: |W| / 256),
where the twin rounds the branch's output once. Otherwise functional.lora_linear runs the twin.
An NF4 W (QLoRA) is dequantized to x's dtype in the forward and again in the backward, never kept.
Equal to the twin within float rounding, gradients included (tests/test_lora_merged.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .nf4 import NF4Tensor, dequantize_nf4


def _dense(weight: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W as a tensor: an NF4 weight dequantized to dtype (x's), in each pass, so it is never kept."""
    return dequantize_nf4(weight, dtype) if isinstance(weight, NF4Tensor) else weight


def can_merge(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              dropout_mask: Optional[torch.Tensor]) -> bool:
    """Whether lora_linear_merged computes the same map as the twin (module docstring). An NF4 weight
    is frozen and dequantizes to x's dtype."""
    nf4 = isinstance(weight, NF4Tensor)
    w_dtype = x.dtype if nf4 else weight.dtype
    # Under autocast F.linear and addmm would run in the autocast dtype whatever x's: the 16-bit W' again.
    return (dropout_mask is None and (nf4 or not weight.requires_grad) and x.dtype in (torch.float32, torch.float64)
            and x.dtype == w_dtype == lora_A.dtype == lora_B.dtype and not torch.is_autocast_enabled(x.device.type))


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' = W + s B A, (N, K); W itself is not modified."""
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


class _LoraLinearMerged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        ctx.scaling, ctx.nf4 = scaling, weight if isinstance(weight, NF4Tensor) else None
        ctx.save_for_backward(x, None if ctx.nf4 else weight, lora_A, lora_B)  # a tensor W is the model's own
        return F.linear(x, merged_weight(_dense(weight, x.dtype), lora_A, lora_B, scaling), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        weight = _dense(ctx.nf4 or weight, x.dtype)
        s, needs = ctx.scaling, ctx.needs_input_grad
        M = grad.shape[:-1].numel()  # from the leading dims: reshape(-1, 0) cannot infer M when K or N is 0
        g, x2 = grad.reshape(M, grad.shape[-1]), x.reshape(M, x.shape[-1])  # (M, N), (M, K)
        dx = grad @ merged_weight(weight, lora_A, lora_B, s) if needs[0] else None
        db = g.sum(0) if needs[2] else None
        dA = ((g @ lora_B).t() @ x2) * s if needs[3] else None
        dB = ((x2 @ lora_A.t()).t() @ g).t() * s if needs[4] else None  # (r,M)@(M,N): faster than gᵀ(xAᵀ) in MKL
        return dx, None, db, dA, dB, None


def lora_linear_merged(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x (W + s B A)ᵀ + b, (..., K) -> (..., N); requires can_merge(x, weight, lora_A, lora_B, None)."""
    if not can_merge(x, weight, lora_A, lora_B, None):
        raise ValueError("lora_linear_merged needs a frozen weight, x, weight, lora_A, lora_B all float32 or all "
                         f"float64 and no autocast; got weight.requires_grad={getattr(weight, 'requires_grad', False)}, "
                         f"dtypes {x.dtype}, {weight.dtype}, {lora_A.dtype}, {lora_B.dtype}, autocast "
                         f"{torch.is_autocast_enabled(x.device.type)}")
    return _LoraLinearMerged.apply(x, weight, bias, lora_A, lora_B, scaling)

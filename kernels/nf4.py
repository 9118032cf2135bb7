"""NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) in Triton: dequantization, and the NF4 base weight
of the fused LoRA kernel.

The stored format is minipeft.nf4's, which is bitsandbytes' (quantize_4bit, blocksize b, nested blocks of
256): for the flat row-major index i of W (N, K), i = n K + k,
    nibble_i = data[i >> 1] >> 4 if i is even else data[i >> 1] & 0xF      (first element in the high nibble)
    scale_j  = DYNAMIC_CODE[absmax[j]] * nested_absmax[j // 256] + offset   (double quant; else absmax[j])
    W_i      = NF4_CODE[nibble_i] * scale_{i // b}
every step a float32 operation rounded to nearest, then one round-to-nearest-even cast to the output dtype.
The kernels follow that order and launch with enable_fp_fusion=False (a fused multiply-add would round
`code * nested + offset` once instead of twice), so `dequantize_nf4` equals minipeft.nf4.dequantize_nf4
bit for bit: tests/test_kernels_nf4.py, which also checks bitsandbytes' own dequantize_4bit.

`nf4_values` computes W at any tile of flat indices, so the fused LoRA GEMM (kernels/lora.py) dequantizes
each (BLOCK_K x BLOCK_N) tile of W, or of W^T for dX, inside its K loop and never materializes W: it reads
4.13 bits per weight instead of 16. Each element gathers its own scale; the gathers of one 64-element block
hit the same cache line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..nf4 import DYNAMIC_CODE, NESTED_BLOCKSIZE, NF4_CODE, NF4Tensor
from .common import INTERPRET, check_span, to_dtype

DEQUANT_BLOCK = 1024  # elements per program of the standalone dequantization
NESTED = tl.constexpr(NESTED_BLOCKSIZE)  # a constexpr global: the only kind a @triton.jit body may read


@triton.jit
def nf4_values(idx, mask, data_ptr, absmax_ptr, nested_ptr, code_ptr, dyn_ptr, offset,
               BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 W at the flat element indices `idx` (a block of any shape); 0 where `mask` is False."""
    # Step 1: the 4-bit code, high nibble for even indices.
    byte = tl.load(data_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble)
    # Step 2: the block's scale, undoing double quantization (two roundings: no FMA, see module docstring).
    block = idx // BLOCKSIZE
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(dyn_ptr + code8) * tl.load(nested_ptr + block // NESTED, mask=mask, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _dequantize_nf4_kernel(
        # Pointers
        data_ptr, absmax_ptr, nested_ptr, code_ptr, dyn_ptr, out_ptr,
        # Sizes and scalars
        n, offset,
        # Meta-parameters
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = W_i for the BLOCK flat indices of this program."""
    idx = tl.program_id(axis=0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    w = nf4_values(idx, mask, data_ptr, absmax_ptr, nested_ptr, code_ptr, dyn_ptr, offset,
                   BLOCKSIZE, DOUBLE_QUANT)
    tl.store(out_ptr + idx, to_dtype(w, out_ptr.dtype.element_ty, UPCAST), mask=mask)


_TABLES: dict = {}


def nf4_kernel_args(q: NF4Tensor) -> tuple:
    """(data, absmax, nested_absmax, NF4 table, dynamic table, offset), the arguments of nf4_values; the
    code tables are copied to q's device once. Without double quant, nested_absmax is a dummy pointer.

    nf4_values indexes every buffer as a flat array. NF4Tensor makes its buffers contiguous when it is built,
    so they are passed as they are; a buffer set to a strided view afterwards (the dataclass is mutable) is
    copied contiguous here, at each call, rather than read wrong."""
    device = q.data.device
    if device not in _TABLES:
        _TABLES[device] = (NF4_CODE.to(device).contiguous(), DYNAMIC_CODE.to(device).contiguous())
    nested = q.nested_absmax if q.nested_absmax is not None else q.absmax
    return (q.data.contiguous(), q.absmax.contiguous(), nested.contiguous(), *_TABLES[device],
            0.0 if q.offset is None else q.offset)


@dataclass(frozen=True)
class NF4Weight:
    """The kernels' view of a 2-D NF4 weight W (N, K), or of W^T (K, N) when `transposed` (for dX).

    `shape` and `stride` describe the logical matrix the way torch does for W and W.t(), so the GEMM
    computes flat indices i = row * stride(0) + col * stride(1) exactly as it computes dense offsets.
    """

    q: NF4Tensor
    transposed: bool = False

    def __post_init__(self) -> None:
        if len(self.q.shape) != 2:
            raise ValueError(f"NF4Weight: expected a 2-D (out_features, in_features) weight, "
                             f"got shape {tuple(self.q.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return (k, n) if self.transposed else (n, k)

    def stride(self, dim: int) -> int:
        strides = (1, self.q.shape[1]) if self.transposed else (self.q.shape[1], 1)
        return strides[dim]

    @property
    def device(self) -> torch.device:
        return self.q.data.device

    def t(self) -> "NF4Weight":
        return NF4Weight(self.q, not self.transposed)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense matrix (a transposed view when `transposed`), by the dequantization kernel."""
        w = dequantize_nf4(self.q, dtype)
        return w.t() if self.transposed else w


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W (q.shape) in `dtype` (default q.dtype), bit for bit minipeft.nf4.dequantize_nf4(q, dtype)."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, got {dtype}")
    n = q.numel()
    check_span("q", n)  # the flat indices of W, and of out, written contiguous
    out = torch.empty(q.shape, dtype=dtype, device=q.data.device)
    data, absmax, nested, code, dyn, offset = nf4_kernel_args(q)
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    _dequantize_nf4_kernel[grid](data, absmax, nested, code, dyn, out, n, offset,
                                 BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.offset is not None,
                                 UPCAST=INTERPRET, BLOCK=DEQUANT_BLOCK, enable_fp_fusion=False)
    return out

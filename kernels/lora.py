"""Fused LoRA linear in Triton: Y = X W^T + b + s * (D(X) A^T) B^T in one GEMM, and its backward.

LoRA (Hu et al. 2021, arXiv:2106.09685). Notation of the whole library, row-major like nn.Linear:
    X (M, K) tokens x in-features,  W (N, K) frozen base weight,  b (N,) bias,
    A = lora_A (r, K),  B = lora_B (N, r),  s = scaling (alpha / r, or alpha / sqrt(r) for rsLoRA),
    D(X) = X * mask / (1 - p): dropout on the LoRA branch's input only (PEFT's lora_dropout).
Eager LoRA is three GEMMs and an add: X is read twice and the (M, N) output is written, read and written
again. Here one kernel streams K once: each X tile feeds the base GEMM and the small U = D(X) A^T (M, r)
together, and the rank-r up-projection is added to the float32 accumulator before the single store.

Blocked algorithm, one program per (BLOCK_M x BLOCK_N) tile of Y (R = r padded to a power of two >= 16):

    acc = zeros(BLOCK_M, BLOCK_N); u = zeros(BLOCK_M, R)                  # float32 accumulators
    for k in range(0, K, BLOCK_K):
        x = X[m : m+BLOCK_M, k : k+BLOCK_K]                                 # read once ...
        acc += x @ W[n : n+BLOCK_N, k : k+BLOCK_K]^T                        # ... base GEMM
        u   += D(x) @ A[:, k : k+BLOCK_K]^T                                 # ... LoRA down-projection
    if n == 0: U[m : m+BLOCK_M, :] = u                                      # saved for the backward
    acc += s * u.to(dtype) @ B[n : n+BLOCK_N, :]^T                          # up-projection, epilogue
    Y[m : m+BLOCK_M, n : n+BLOCK_N] = (acc + b[n : n+BLOCK_N]).to(dtype)    # one write

Cost: every column tile recomputes its rows of U, i.e. 2MK r (N / BLOCK_N) extra FLOPs, a fraction
r / BLOCK_N of the base GEMM (12% at r=16, BLOCK_N=128). That is free while the GEMM is memory bound
(decode, M up to a few hundred: the weight read dominates) but not when it is compute bound, so for
M > XA_IN_LOOP_MAX_M U is computed once by cuBLAS (2MKr FLOPs, one more read of X) and the kernel loads
it in the epilogue (XA_IN_LOOP=False): base GEMM + r(K + N)/(KN) more FLOPs, still one output write.

The backward has the same shape (derivation in LoRALinearFunction), so the same kernel computes
dX = dY W + Delta * (s (dY B) A), Delta = mask / (1 - p), with the operands transposed through their
strides and the dropout mask applied to the LoRA term of the output instead of the input (DROPOUT=2).

QLoRA: W may be an NF4 weight (kernels/nf4.py). With W_NF4 the K loop dequantizes each W tile from its
packed 4-bit codes instead of loading it (the same flat offsets index the codes), so W is never stored in
16 bits; its W^T for dX is the same buffers read with swapped strides.

Tested in tests/test_kernels_lora.py (interpreter on CPU) against the eager twin
minipeft.functional.lora_linear_torch and against plain autograd in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..functional import apply_dropout_mask
from ..nf4 import NF4Tensor
from .common import (INTERPRET, MATMUL_CONFIGS, SUPPORTED_DTYPES, check_operand, check_span, dot_precision,
                     grouped_tile, m_bucket, mma, prune_configs, rank_pad, to_dtype)
from .nf4 import NF4Weight, nf4_kernel_args, nf4_values

# Tokens above which U = D(X) A^T is precomputed rather than recomputed per column tile (see above): near
# the point where a bf16 GEMM on a current GPU turns compute bound (FLOPs per weight byte ~ M).
XA_IN_LOOP_MAX_M = 256
MAX_RANK = 128  # u (BLOCK_M x R) lives in registers next to acc; larger ranks fall back to eager
# Rows up to which the QLoRA GEMM dequantizes NF4 tiles in its K loop. Dequantizing costs about 15 integer
# ops and 5 cached gathers per weight, and every row tile of programs redoes it for all of W: cheap next to
# the 4x smaller weight read while one row tile covers all tokens (decode), but repeated M / BLOCK_M times
# for long inputs, where dequantizing W once (dequantization kernel) and running the dense GEMM costs less.
NF4_FUSED_MAX_M = 16


@triton.jit
def _weight_tile(w_ptr, offs, mask, q_data, q_absmax, q_nested, q_code, q_dyn, q_offset, dtype: tl.constexpr,
                 W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_DOUBLE_QUANT: tl.constexpr,
                 UPCAST: tl.constexpr):
    """The weight at element offsets `offs` (0 where not `mask`): loaded, or dequantized from NF4."""
    if W_NF4:
        w = nf4_values(offs, mask, q_data, q_absmax, q_nested, q_code, q_dyn, q_offset,
                       NF4_BLOCKSIZE, NF4_DOUBLE_QUANT)
        w = to_dtype(w, dtype, UPCAST)
    else:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    return w


@triton.autotune(configs=MATMUL_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "XA_IN_LOOP", "DROPOUT", "W_NF4"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _lora_matmul_kernel(
        # Pointers (q_*: the NF4 weight's buffers and code tables, used instead of w_ptr when W_NF4)
        x_ptr, w_ptr, a_ptr, b_ptr, u_ptr, mask_ptr, bias_ptr, out_ptr,
        q_data, q_absmax, q_nested, q_code, q_dyn,
        # Sizes (M_BUCKET only keys the autotuner)
        M, N, K, R, M_BUCKET,
        # Strides, in elements
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_um, stride_ur, stride_dm, stride_dc, stride_om, stride_on,
        # Scalars
        scaling, keep_scale, q_offset,
        # Meta-parameters
        DROPOUT: tl.constexpr,  # 0: none, 1: on the LoRA input (forward), 2: on the LoRA output (dX)
        XA_IN_LOOP: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
        W_NF4: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_DOUBLE_QUANT: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = X W^T + s * (D(X) A^T) B^T (+ bias), with X (M, K), W (N, K), A (R, K), B (N, R)."""
    dtype = x_ptr.dtype.element_ty  # compute dtype: X, W, out. A, B, U may be float32 (see lora_matmul)
    # Step 1: which output tile. Rows and columns wrap (% M, % N) so loads need no mask on them; the
    # wrapped rows are computed and never stored (tutorial 03).
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = rows % M
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R  # the padded ranks must read as zeros

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_offs = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # W^T tile (BLOCK_K, BLOCK_N)
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # A^T tile (BLOCK_K, R_PAD)
    d_ptrs = mask_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dc

    # Step 2: stream K once; each X tile feeds the base GEMM and, if in the loop, the down-projection.
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    u = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = _weight_tile(w_ptr, w_offs, k_ok[:, None], q_data, q_absmax, q_nested, q_code, q_dyn, q_offset,
                         dtype, W_NF4, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, UPCAST)
        acc = mma(x, w, acc, PRECISION, UPCAST)
        if XA_IN_LOOP:
            if DROPOUT == 1:
                keep = tl.load(d_ptrs, mask=k_ok[None, :], other=0) != 0
                # Same rounding as the twin: x * keep_scale in float32, rounded to the input dtype.
                x = tl.where(keep, to_dtype(x.to(tl.float32) * keep_scale, dtype, UPCAST), 0.0)
            a = to_dtype(tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0), dtype, UPCAST)
            u = mma(x, a, u, PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_offs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        d_ptrs += BLOCK_K * stride_dc

    # Step 3: U in its own dtype (the first column of programs saves it), then as a dot operand.
    u_ptrs = u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur
    u_ok = (rows[:, None] < M) & r_ok[None, :]
    if XA_IN_LOOP:
        u = to_dtype(u, u_ptr.dtype.element_ty, UPCAST)
        if pid_n == 0:
            tl.store(u_ptrs, u, mask=u_ok)
    else:
        u = tl.load(u_ptrs, mask=u_ok, other=0.0)
    u = to_dtype(u, dtype, UPCAST)

    # Step 4: epilogue in float32: rank-r up-projection, dropout of the output (backward), bias.
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile (R_PAD, BLOCK_N)
    b = to_dtype(tl.load(b_ptrs, mask=r_ok[:, None], other=0.0), dtype, UPCAST)
    lora = mma(u, b, tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), PRECISION, UPCAST)
    if DROPOUT == 2:
        keep = tl.load(mask_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dc) != 0
        lora = tl.where(keep, lora * keep_scale, 0.0)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]

    # Step 5: the one write of the output tile.
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, to_dtype(acc, dtype, UPCAST), mask=(rows[:, None] < M) & (cols[None, :] < N))


def lora_matmul(x: torch.Tensor, w, a: torch.Tensor, b: torch.Tensor, scaling: float,
                bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                mask_on_output: bool = False, keep_scale: float = 1.0,
                u: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, U) with out = x w^T + s (D(x) a^T) b^T + bias and U = D(x) a^T, for 2-D x (M, K), w (N, K),
    a (R, K), b (N, R), bias (N,), any strides. `w` is a tensor or an NF4Weight (dequantized tile by tile to x's
    dtype). `mask` (bool) drops the LoRA input (M, K), or with mask_on_output its output (M, N); kept
    values are scaled by keep_scale. If `u` (M, R) is given it is used as U instead of being computed in
    the K loop.

    x, w, bias and out share the compute dtype (float16, bfloat16 or float32). a, b and U have that dtype
    or float32: PEFT keeps adapters in float32 under a 16-bit base; their tiles are rounded to the
    compute dtype for the tensor-core dot, as torch.autocast would, and U is written in float32.
    """
    # Check.
    m, k = x.shape
    n, r = b.shape
    nf4 = isinstance(w, NF4Weight)
    if x.dtype not in SUPPORTED_DTYPES or a.dtype not in (x.dtype, torch.float32) or not 1 <= r <= MAX_RANK:
        raise ValueError(f"lora_matmul: needs x in {SUPPORTED_DTYPES}, lora weights in x's dtype or float32 and "
                         f"1 <= r <= {MAX_RANK}; got x {x.dtype}, lora {a.dtype}, r={r}")
    if a.shape[0] != r:  # r is taken from b: say that they disagree, not that a alone is wrong
        raise ValueError(f"lora_matmul: the ranks of a and b disagree: a {tuple(a.shape)} has {a.shape[0]} rows, "
                         f"b {tuple(b.shape)} has {r} columns")
    for name, t, shape, dtype in (("x", x, (m, k), x.dtype), ("w", w, (n, k), x.dtype), ("bias", bias, (n,), x.dtype),
                                  ("a", a, (r, k), a.dtype), ("b", b, (n, r), a.dtype), ("u", u, (m, r), a.dtype),
                                  ("mask", mask, (m, n) if mask_on_output else (m, k), torch.bool)):
        if t is not None:
            check_operand(name, t, shape, dtype if not (nf4 and name == "w") else None, x.device)
    check_span("out", m * n)  # out, and U when the kernel computes it, are allocated contiguous below
    if u is None:
        check_span("u", m * r)
    # Allocate.
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # The kernel reads bias[n] at bias_ptr + n: a strided (N,) view would give other elements. Copying N
    # values is free next to the GEMM, and only happens for such a view.
    bias = None if bias is None else bias.contiguous()
    xa_in_loop = u is None
    if xa_in_loop:
        u = torch.empty((m, r), dtype=a.dtype, device=x.device)
    if m == 0:
        return out, u
    dmask = (mask if mask is not None else x.new_empty((1, 1), dtype=torch.bool)).view(torch.uint8)
    # NF4: the GEMM reads the weight's buffers instead of w_ptr (dummy pointers are never dereferenced).
    q_args = nf4_kernel_args(w.q) if nf4 else (x, x, x, x, x, 0.0)
    # Launch.
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _lora_matmul_kernel[grid](
        x, x if nf4 else w, a, b, u, dmask, bias if bias is not None else out, out, *q_args[:5],
        m, n, k, r, m_bucket(m),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        u.stride(0), u.stride(1), dmask.stride(0), dmask.stride(1), out.stride(0), out.stride(1),
        scaling, keep_scale, q_args[5],
        DROPOUT=0 if mask is None else (2 if mask_on_output else 1), XA_IN_LOOP=xa_in_loop,
        HAS_BIAS=bias is not None, R_PAD=rank_pad(r),
        W_NF4=nf4, NF4_BLOCKSIZE=w.q.blocksize if nf4 else 64, NF4_DOUBLE_QUANT=nf4 and w.q.offset is not None,
        PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
        enable_fp_fusion=not nf4)  # NF4: no FMA, so W rounds exactly like minipeft.nf4 (see kernels/nf4.py)
    return out, u


def _gemm_weight(weight, dtype: torch.dtype, nf4_fused: bool):
    """The weight as the GEMM takes it: dense; NF4 dequantized tile by tile in the K loop (fused); or NF4
    dequantized up front by the dequantization kernel into a transient dense copy (what bitsandbytes does
    for more than one token), freed after the GEMM."""
    if isinstance(weight, NF4Weight) and not nf4_fused:
        return weight.dequantize(dtype)
    return weight


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of the fused LoRA linear on 2-D x; W is frozen, so no dW unless W itself requires grad.

    Forward, with Delta = mask / (1 - p) (all ones without dropout) and D(X) = X * Delta:
        U = D(X) A^T                      (M, r)     saved, written by the forward kernel
        Y = X W^T + b + s U B^T           (M, N)
    Backward, G = dL/dY (M, N); the chain rule through Y = ... + s U B^T and U = D(X) A^T gives
        dL/dU = s G B                     (M, r)     (G B computed by the dX kernel, or eagerly)
        dL/dB = s G^T U                   (N, r)     from the saved U: no recomputation
        dL/dA = (dL/dU)^T D(X) = s (G B)^T D(X)                         (r, K)
        dL/dX = G W + Delta * ((dL/dU) A) = G W + Delta * (s (G B) A)   (M, K)
        dL/db = sum_m G                   (N,)       only when the bias trains (PEFT bias="lora_only"/"all")
        dL/dW = G^T X                     (N, K)     only when a dense W requires grad (not in LoRA)
    dL/dX is the forward's computation with X -> G, W -> W^T (K, N), A -> B^T (r, N), B -> A^T (K, r),
    the mask moved from the LoRA input to the LoRA output: one kernel call through strides, no copies
    (an NF4 W^T is the same buffers read with swapped strides).
    Saved: X (for D(X) in dA), the boolean mask, U (M, r). X is the only (M, K) tensor kept, as in PEFT;
    an NF4 weight stays 4-bit between forward and backward. dA and dB are computed in the adapters' dtype
    (float32 adapters get float32 gradients).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, mask: Optional[torch.Tensor], keep_scale: float,
                xa_in_loop: bool, nf4_fused: bool) -> torch.Tensor:
        u = None if xa_in_loop else apply_dropout_mask(x.to(lora_A.dtype), mask, keep_scale) @ lora_A.t()
        y, u = lora_matmul(x, _gemm_weight(weight, x.dtype, nf4_fused), lora_A, lora_B, scaling, bias, mask,
                           False, keep_scale, u)
        dense = weight if isinstance(weight, torch.Tensor) else None
        ctx.save_for_backward(x, dense, lora_A, lora_B, mask, u)
        ctx.nf4_weight = None if dense is not None else weight
        ctx.scaling, ctx.keep_scale, ctx.xa_in_loop, ctx.nf4_fused = scaling, keep_scale, xa_in_loop, nf4_fused
        return y

    @staticmethod
    @once_differentiable  # dX comes from a kernel, outside autograd: refuse create_graph, never half a graph
    def backward(ctx, g: torch.Tensor):
        x, dense, lora_A, lora_B, mask, u = ctx.saved_tensors
        weight = dense if dense is not None else ctx.nf4_weight
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s, lora_dtype = ctx.scaling, lora_A.dtype
        dx = dw = dbias = da = db = None
        gb = None  # G B (M, r): written by the dX kernel when it runs with the product in its loop
        if (need_a or need_x) and not (need_x and ctx.xa_in_loop):
            gb = g.to(lora_dtype) @ lora_B
        if need_x:
            w_t = _gemm_weight(weight.t(), g.dtype, ctx.nf4_fused)
            dx, gb = lora_matmul(g, w_t, lora_B.t(), lora_A.t(), s, None, mask, True, ctx.keep_scale,
                                 None if ctx.xa_in_loop else gb)
        if need_a:
            da = (gb.t() @ apply_dropout_mask(x.to(lora_dtype), mask, ctx.keep_scale)) * s
        if need_b:
            db = (g.to(lora_dtype).t() @ u) * s
        if need_bias:
            dbias = g.sum(0)
        if need_w:
            dw = g.t() @ x
        return dx, dw, dbias, da, db, None, None, None, None, None


def _apply(x: torch.Tensor, weight, n_out: int, bias, lora_A, lora_B, scaling, dropout_mask, keep_scale,
           xa_in_loop: Optional[bool], nf4_fused: bool) -> torch.Tensor:
    """LoRALinearFunction on x (..., K) flattened to 2-D, the output reshaped back to (..., n_out)."""
    k, m = x.shape[-1], x.shape[:-1].numel()
    # Rows counted from the leading dims: reshape(-1, 0) cannot infer them (in_features 0, as nn.Linear allows).
    x2 = x.reshape(m, k)
    mask2 = None if dropout_mask is None else dropout_mask.reshape(m, k)
    if xa_in_loop is None:
        xa_in_loop = x2.shape[0] <= XA_IN_LOOP_MAX_M
    y = LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), mask2, float(keep_scale),
                                 xa_in_loop, nf4_fused)
    return y.reshape(*x.shape[:-1], n_out)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_mask: Optional[torch.Tensor] = None,
                keep_scale: float = 1.0, xa_in_loop: Optional[bool] = None) -> torch.Tensor:
    """The fused LoRA linear on x (..., K): x W^T + b + s (D(x) A^T) B^T, D(x) = where(mask, x keep_scale, 0).

    dropout_mask: bool, x's shape, or None. xa_in_loop: compute U in the K loop (default: when the rows of
    x flattened are at most XA_IN_LOOP_MAX_M), else precompute it with one eager GEMM.
    """
    return _apply(x, weight, weight.shape[0], bias, lora_A, lora_B, scaling, dropout_mask, keep_scale,
                  xa_in_loop, False)


def nf4_lora_linear(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_mask: Optional[torch.Tensor] = None,
                    keep_scale: float = 1.0, xa_in_loop: Optional[bool] = None,
                    fused: Optional[bool] = None) -> torch.Tensor:
    """The QLoRA linear: lora_linear with W = dequantize_nf4(weight) in x's dtype; only the 4-bit weight is
    kept, between calls and between forward and backward.

    fused: dequantize W tiles inside the GEMM's K loop (default for at most NF4_FUSED_MAX_M rows: decode,
    where the 4-bit weight read is the cost), else dequantize W at each GEMM into a transient dense copy.
    """
    w = NF4Weight(weight)
    m = x.numel() // max(x.shape[-1], 1)
    return _apply(x, w, w.shape[0], bias, lora_A, lora_B, scaling, dropout_mask, keep_scale, xa_in_loop,
                  m <= NF4_FUSED_MAX_M if fused is None else fused)

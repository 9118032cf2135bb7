"""NF4 kernels: dequantization bit for bit, the QLoRA linear (fused dequantize-GEMM + LoRA), the dispatch.

References: minipeft.nf4.dequantize_nf4 and bitsandbytes' own dequantize_4bit (bit for bit); float64
autograd of y = x W^T + b + s ((x * Delta) A^T) B^T with W the spec's dequantized weight. Without CUDA the
kernels run on Triton's interpreter, TRITON_INTERPRET=1 being set for this module only; with CUDA on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from interpreted import DEVICE, _interpreter, common, klora, knf4  # noqa: F401 (_interpreter: an autouse fixture)
from minipeft.kernels import triton_interpreter

with triton_interpreter(enabled=DEVICE == "cpu"):  # a test kernel of this module, defined as the flag says
    import triton
    import triton.language as tl

    @triton.jit
    def _to_dtype_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, common.to_dtype(x, out_ptr.dtype.element_ty, UPCAST), mask=offs < n)

from minipeft import functional as MF  # noqa: E402
from minipeft import nf4  # noqa: E402


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BITS = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (torch.equal would call -0.0 and 0.0 equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def test_to_dtype_rounds_float32_to_bfloat16_like_torch():
    """Round to nearest, ties to even, overflow to inf: the bits dequantization is bit-exact by."""
    patterns = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF818000, 0x7F7FFFFF, 0x7F7F7FFF,
                0x00008000, 0x00018000, 0x80000000, 0x3F800000, 0x4049_0FDB]
    x = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(F32).to(DEVICE)
    out = torch.empty(len(patterns), dtype=BF16, device=DEVICE)
    _to_dtype_kernel[(1,)](x, out, len(patterns), BLOCK=16, UPCAST=common.INTERPRET)
    assert bitwise_equal(out, x.to(BF16)), (out.view(torch.int16), x.to(BF16).view(torch.int16))


# shape, blocksize, double quant: odd element counts (a lone last nibble), partial last blocks, more than
# 256 blocks (two nested-absmax blocks), 1-D and 3-D tensors.
DEQUANT_CASES = [((131, 135), 64, True), ((64, 64), 64, False), ((7,), 32, True), ((3, 5, 67), 128, True),
                 ((33, 65), 256, False)]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape,blocksize,double_quant", DEQUANT_CASES, ids=str)
def test_dequantize_kernel_is_bit_exact(shape, blocksize, double_quant, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    q = nf4.quantize_nf4(w.to(DEVICE, dtype), blocksize=blocksize, double_quant=double_quant)
    got = knf4.dequantize_nf4(q, dtype)
    assert bitwise_equal(got, nf4.dequantize_nf4(q, dtype))
    if dtype != F32:  # the float32 rounding path too, from the same codes
        assert bitwise_equal(knf4.dequantize_nf4(q, F32), nf4.dequantize_nf4(q, F32))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_dequantize_kernel_equals_bitsandbytes(dtype):
    """bitsandbytes' layout is the contract: its own quantized buffers, its own dequantization."""
    import bitsandbytes.functional as bnb_f
    w = (torch.randn(131, 135, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = bnb_f.dequantize_4bit(packed, state)
    q = nf4.NF4Tensor(packed.view(-1).to(DEVICE), state.absmax.to(DEVICE), state.state2.absmax.to(DEVICE),
                      state.offset.item(), w.shape, 64, dtype)
    assert bitwise_equal(knf4.dequantize_nf4(q, dtype).cpu(), want)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_strided_nf4_buffers_read_like_contiguous_ones(double_quant):
    """NF4Tensor makes its buffers contiguous when built, but is mutable: a buffer set to a view afterwards
    (every other element of a larger one) must still dequantize, and multiply in the fused GEMM, exactly like
    the contiguous one, as the kernels index buffers as flat arrays (read flat, a stride-2 view gives other
    codes and scales)."""
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize_nf4((torch.randn(131, 135, generator=g) * 0.05).to(DEVICE, BF16), double_quant=double_quant)
    every_other = lambda t: None if t is None else torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    qs = nf4.NF4Tensor(q.data, q.absmax, q.nested_absmax, q.offset, q.shape, q.blocksize, q.dtype)
    qs.data, qs.absmax, qs.nested_absmax = (every_other(t) for t in (q.data, q.absmax, q.nested_absmax))
    assert not any(t.is_contiguous() for t in (qs.data, qs.absmax, qs.nested_absmax) if t is not None)
    want = nf4.dequantize_nf4(q, BF16)
    assert bitwise_equal(nf4.dequantize_nf4(qs, BF16), want)  # the reference reads views as views
    assert bitwise_equal(knf4.dequantize_nf4(qs, BF16), want)
    x, lora_A, lora_B = (torch.randn(*s, generator=g).to(DEVICE, BF16) for s in ((3, 135), (8, 135), (131, 8)))
    fused = lambda q: klora.nf4_lora_linear(x, q, None, lora_A * 0.1, lora_B * 0.1, 2.0, fused=True)
    assert bitwise_equal(fused(qs), fused(q))


def test_nf4_weight_past_int32_offsets_is_refused():
    """A weight of 2**31 elements (meta buffers: nothing allocated) would index its codes past int32: both
    kernels refuse it by name (see tests/test_kernels_lora.py for the dense operands)."""
    n, meta = 2 ** 31, lambda numel, dt: torch.empty(numel, dtype=dt, device="meta")
    q = nf4.NF4Tensor(meta(n // 2, torch.uint8), meta(n // 64, torch.uint8), meta(n // 64 // 256, F32), 0.0,
                      (2 ** 16, 2 ** 15), 64, BF16)
    limit = common.MAX_SPAN
    with pytest.raises(ValueError, match=rf"q: its elements span {n} in memory, .*\({limit}\)"):
        knf4.dequantize_nf4(q, BF16)
    x, lora_A, lora_B = (torch.empty(*s, dtype=BF16, device="meta") for s in ((1, 2 ** 15), (8, 2 ** 15), (2 ** 16, 8)))
    with pytest.raises(ValueError, match=rf"w: its elements span {n} in memory"):
        klora.lora_matmul(x, knf4.NF4Weight(q), lora_A, lora_B, 2.0)
    # the dispatcher knows the limit: auto (on CUDA) takes PyTorch; forced triton says why it cannot
    with MF.use_kernels("triton"), pytest.raises(ValueError, match=rf"cannot run: a weight of {n} elements"):
        MF.dequantize_nf4(q, BF16)


# --- the QLoRA linear -----------------------------------------------------------------------------------

# Normwise tolerances against float64, as in tests/test_kernels_lora.py (same arithmetic once W is
# dequantized, and W is bit-exact): float32 1e-5 (summation order only, ~1e-7 seen); bfloat16 2^-6 (a
# few roundings of 2^-9 each, ~5e-3 seen), both far below the O(1) error of any wrong weight or LoRA tile.
TOL = {F32: 1e-5, BF16: 2 ** -6}

# M, K, N, r, bias, dropout p, dtype, lora dtype, fused, blocksize, double quant. Odd K makes rows of W
# start at odd flat indices (low nibble first), in W and in the W^T that dX reads; M <= 16 is the GEMV
# path; fused=False is the dequantize-then-GEMM path used for longer inputs.
CASES = [
    (1, 64, 45, 8, True, 0.0, BF16, BF16, True, 64, True),
    (3, 45, 33, 16, False, 0.25, F32, F32, True, 64, True),
    (16, 33, 64, 1, True, 0.0, BF16, F32, True, 32, False),
    (37, 45, 40, 8, True, 0.1, BF16, F32, True, 64, True),
    (37, 64, 70, 64, True, 0.5, F32, F32, False, 64, True),
]


def _case_id(case) -> str:
    m, k, n, r, bias, p, dtype, lora_dtype, fused, bs, dq = case
    return (f"M{m}-K{k}-N{n}-r{r}-{'bias' if bias else 'nobias'}-p{p}-{str(dtype)[6:]}-lora_{str(lora_dtype)[6:]}"
            f"-{'fused' if fused else 'dequant'}-bs{bs}-{'dq' if dq else 'nodq'}")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def make_inputs(m, k, n, r, bias, dtype, lora_dtype, blocksize, double_quant):
    """x, the NF4 weight, bias, A, B with every term of y O(1); seeds the RNG of the dropout masks too."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    t = lambda *shape, scale=1.0, dt=dtype: (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)
    q = nf4.quantize_nf4(t(n, k, scale=k ** -0.5), blocksize=blocksize, double_quant=double_quant)
    return t(m, k), q, (t(n) if bias else None), t(r, k, scale=k ** -0.5, dt=lora_dtype), \
        t(n, r, scale=r ** -0.5, dt=lora_dtype)


def run(fn, x, b, lora_A, lora_B, grad_out):
    """fn(x, b, A, B) and the gradients w.r.t. x, A, B (the trainable tensors of QLoRA) and b if any."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, b, lora_A, lora_B)]
    y = fn(*leaves)
    y.backward(grad_out.to(y.dtype))
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nf4_lora_linear_matches_reference(case):
    m, k, n, r, bias, p, dtype, lora_dtype, fused, blocksize, double_quant = case
    x, q, b, lora_A, lora_B = make_inputs(m, k, n, r, bias, dtype, lora_dtype, blocksize, double_quant)
    mask, keep = MF.dropout_mask(x, p, training=True)
    grad_out = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w64 = nf4.dequantize_nf4(q, dtype).double()  # the spec's W, rounded to the compute dtype as the paths do

    def reference(x, b, a, bb):
        x_lora = x if mask is None else x * mask * keep
        y = x @ w64.T + ((x_lora @ a.T) @ bb.T) * 2.0
        return y if b is None else y + b

    to64 = lambda t: None if t is None else t.double()
    ref = run(reference, to64(x), to64(b), to64(lora_A), to64(lora_B), grad_out.double())
    kernel = run(lambda *t: klora.nf4_lora_linear(t[0], q, t[1], t[2], t[3], 2.0, mask, keep, fused=fused),
                 x, b, lora_A, lora_B, grad_out)
    twin = run(lambda *t: MF.nf4_lora_linear_torch(t[0], q, t[1], t[2], t[3], 2.0, mask, keep),
               x, b, lora_A, lora_B, grad_out)
    for name, got_k, got_t, want in zip(["y", "dx", "dbias", "dA", "dB"] if bias else ["y", "dx", "dA", "dB"],
                                        kernel, twin, ref):
        assert rel_err(got_k, want) <= TOL[dtype], (name, rel_err(got_k, want))
        assert rel_err(got_t, want) <= TOL[dtype], (name, rel_err(got_t, want))
        assert rel_err(got_k, got_t.double()) <= TOL[dtype], (name, "kernel vs twin")


# --- dispatch -------------------------------------------------------------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    """Records which kernel entry points functional dispatched to."""
    calls = []

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    for module, name in ((klora, "nf4_lora_linear"), (knf4, "dequantize_nf4")):
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    monkeypatch.delenv(MF.ENV_VAR, raising=False)
    return calls


@pytest.mark.skipif(DEVICE == "cuda", reason="auto picks the twin only for CPU tensors")
def test_dispatch_auto_twin_on_cpu_triton_forced(kernel_calls):
    x, q, b, lora_A, lora_B = make_inputs(3, 45, 33, 8, True, BF16, F32, 64, True)
    auto_w = MF.dequantize_nf4(q, BF16)
    auto_y = MF.nf4_lora_linear(x, q, b, lora_A, lora_B, 2.0)
    assert kernel_calls == []
    assert torch.equal(auto_y, MF.nf4_lora_linear_torch(x, q, b, lora_A, lora_B, 2.0))
    with MF.use_kernels("triton"):
        forced_w = MF.dequantize_nf4(q, BF16)
        forced_y = MF.nf4_lora_linear(x, q, b, lora_A, lora_B, 2.0)
    assert kernel_calls == ["dequantize_nf4", "nf4_lora_linear"]
    assert bitwise_equal(forced_w, auto_w)
    assert rel_err(forced_y, auto_y.double()) <= TOL[BF16]
    with pytest.raises(ValueError, match="2-D NF4 weight"):
        MF.nf4_lora_linear(x, nf4.quantize_nf4(torch.randn(7)), b, lora_A, lora_B, 2.0)

"""LoRA through the merged weight (minipeft.lora_merged) against float64 autograd of the formula itself,
and the rule by which functional.lora_linear takes it."""
from __future__ import annotations

import pytest
import torch

from minipeft import functional as MF
from minipeft import lora_merged, nf4
from minipeft.lora_merged import can_merge, lora_linear_merged

# Normwise max|got - ref| / max|ref| against float64: float32 differs by summation order only (~1e-7
# seen over <= 130 terms of O(1)), so 1e-5 has 100x margin and still catches a wrong transpose, scale or
# missing term (errors of O(1e-1)); float64 gets the same argument at its own epsilon.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def inputs(shape, k, n, r, bias, dtype, seed=0):
    """x (*shape, k) ~ N(0,1); W, b, A, B scaled so the LoRA term is as large as the base term."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)
    return t(*shape, k), t(n, k, scale=k ** -0.5), t(n) if bias else None, t(r, k, scale=k ** -0.5), t(n, r, scale=r ** -0.5)


def run(fn, tensors, trainable, grad_out):
    """[fn(*tensors)] + gradients of <y, grad_out> w.r.t. the tensors whose index is in trainable."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(i in trainable) for i, t in enumerate(tensors)]
    y = fn(*leaves)
    y.backward(grad_out.to(y.dtype))
    return [y] + [leaves[i].grad for i in trainable]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,k,n,r,bias", [((1,), 33, 40, 8, True), ((37,), 45, 70, 16, False),
                                              ((2, 65), 64, 45, 1, True), ((3, 1, 130), 31, 33, 64, True)])
@pytest.mark.parametrize("trainable", [(0, 3, 4), (3, 4), (0, 2, 3, 4)], ids=["x-A-B", "A-B", "x-b-A-B"])
def test_matches_the_formula_in_float64(shape, k, n, r, bias, dtype, trainable):
    """y and every gradient asked for (x, bias, A, B: W is frozen) equal float64 autograd of
    x Wᵀ + b + s (x Aᵀ) Bᵀ; leading dims of any rank; r from 1 to 64."""
    bias = bias or 2 in trainable  # a trained bias (LoraConfig bias="all") needs one
    x, weight, b, lora_A, lora_B = inputs(shape, k, n, r, bias, dtype)
    s = 2.5
    grad_out = torch.randn(*shape, n, generator=torch.Generator().manual_seed(1))
    formula = lambda x, w, b, a, bb: x @ w.T + (x @ a.T) @ bb.T * s + (0 if b is None else b)
    want = run(formula, [None if t is None else t.double() for t in (x, weight, b, lora_A, lora_B)], trainable,
               grad_out.double())
    got = run(lambda *t: lora_linear_merged(*t, s), [x, weight, b, lora_A, lora_B], trainable, grad_out)
    for name, g, w in zip(["y"] + [f"d{i}" for i in trainable], got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert rel_err(g, w) <= TOL[dtype], (name, rel_err(g, w))


def test_weight_is_neither_modified_nor_given_a_gradient():
    x, weight, b, lora_A, lora_B = inputs((5,), 16, 24, 4, True, torch.float32)
    before = weight.clone()
    lora_A.requires_grad_(True)
    lora_linear_merged(x, weight, b, lora_A, lora_B, 3.0).sum().backward()
    assert torch.equal(weight, before) and weight.grad is None and lora_A.grad is not None


def test_empty_batch_gives_empty_output_and_zero_gradients():
    x, weight, b, lora_A, lora_B = inputs((0,), 16, 24, 4, True, torch.float32)
    lora_B.requires_grad_(True)
    y = lora_linear_merged(x, weight, b, lora_A, lora_B, 3.0)
    y.sum().backward()
    assert y.shape == (0, 24) and torch.equal(lora_B.grad, torch.zeros_like(lora_B))


@pytest.mark.parametrize("k,n", [(0, 5), (5, 0)])
def test_no_in_or_out_features_matches_the_twin(k, n):
    """reshape(-1, 0) cannot infer the rows of a 0-wide tensor: the backward raised."""
    x, weight, b, lora_A, lora_B = torch.randn(2, 3, k), torch.randn(n, k), torch.randn(n), torch.randn(2, k), \
        torch.randn(n, 2)
    grads = []
    for f in (lora_linear_merged, MF.lora_linear_torch):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, lora_A, lora_B)]
        y = f(leaves[0], weight, leaves[1], leaves[2], leaves[3], 0.5)
        y.sum().backward()
        grads.append([y.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def test_what_can_merge_and_the_error_otherwise():
    x, weight, b, lora_A, lora_B = inputs((5,), 16, 24, 4, True, torch.float32)
    mask, _ = MF.dropout_mask(x, 0.5, training=True)
    bf16 = [t.bfloat16() for t in (x, weight, lora_A, lora_B)]
    assert can_merge(x, weight, lora_A, lora_B, None)
    assert not can_merge(x, weight, lora_A, lora_B, mask)  # dropout: the branch sees another input
    assert not can_merge(*bf16, None)  # 16-bit W' would round s B A away
    assert not can_merge(x, weight, lora_A.double(), lora_B.double(), None)
    assert not can_merge(x, weight.clone().requires_grad_(True), lora_A, lora_B, None)  # W trains
    with pytest.raises(ValueError, match="frozen weight.*float32 or all float64.*bfloat16"):
        lora_linear_merged(*bf16[:2], None, *bf16[2:], 1.0)


@pytest.fixture
def merged_calls(monkeypatch):
    calls = []
    real = lora_merged._LoraLinearMerged.apply
    monkeypatch.setattr(lora_merged._LoraLinearMerged, "apply", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("mode", ["torch", "auto"])
def test_pytorch_path_merges_exactly_when_it_may(merged_calls, mode):
    """lora_linear and nf4_lora_linear take the merged form for a frozen float32 W without dropout, and the
    twin when dropout draws a mask, in bfloat16, or when W trains; both agree with the twin."""
    x, weight, b, lora_A, lora_B = inputs((37,), 64, 45, 8, True, torch.float32)
    twin = MF.lora_linear_torch(x, weight, b, lora_A, lora_B, 2.0)
    with MF.use_kernels(mode):
        y = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout=0.3, training=False)
        assert len(merged_calls) == 1 and rel_err(y, twin.double()) <= TOL[torch.float32]
        q = nf4.quantize_nf4(weight, blocksize=64)
        y4 = MF.nf4_lora_linear(x, q, b, lora_A, lora_B, 2.0)
        assert len(merged_calls) == 2
        assert rel_err(y4, MF.nf4_lora_linear_torch(x, q, b, lora_A, lora_B, 2.0).double()) <= TOL[torch.float32]
        MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout=0.3, training=True)
        MF.lora_linear(x.bfloat16(), weight.bfloat16(), b.bfloat16(), lora_A, lora_B, 2.0)
        MF.lora_linear(x, weight.clone().requires_grad_(True), b, lora_A, lora_B, 2.0)
    assert len(merged_calls) == 2


def test_forward_is_one_full_matmul_plus_the_rank_r_product():
    """torch.profiler's multiply FLOPs: x W'ᵀ (2MKN) and W' = W + s B A (2NrK), where the twin runs
    x Wᵀ, x Aᵀ and (x Aᵀ) Bᵀ: the same 2MKN plus 2Mr(K + N), and two more passes over (M, N)."""
    M, K, N, r = 64, 48, 40, 8
    x, weight, b, lora_A, lora_B = inputs((M,), K, N, r, True, torch.float32)
    with torch.profiler.profile(with_flops=True) as prof:
        lora_linear_merged(x, weight, b, lora_A, lora_B, 2.0)
    ops = {e.key: e for e in prof.key_averages()}
    assert sum(ops[k].flops for k in ("aten::mm", "aten::addmm") if k in ops) == 2 * M * K * N + 2 * N * r * K
    assert "aten::mul" not in ops and "aten::add" not in ops  # the scaling and the sum ride inside addmm


def test_autocast_takes_the_twin(merged_calls):
    """Under CPU bfloat16 autocast the merged form would build W' in bfloat16 and lose a small s B A (relative
    error 2.1 for B ~ 1e-4 against the twin's 0.9): it must not be taken, whatever the tensors' dtypes."""
    x, weight, b, lora_A, lora_B = inputs((64,), 128, 96, 8, True, torch.float32)
    lora_B = lora_B * 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_merge(x, weight, lora_A, lora_B, None)
        y = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
        twin = MF.lora_linear_torch(x, weight, b, lora_A, lora_B, 2.0)
        with pytest.raises(ValueError, match="no autocast.*autocast True"):
            lora_linear_merged(x, weight, b, lora_A, lora_B, 2.0)
    assert not merged_calls and torch.equal(y, twin)
    assert can_merge(x, weight, lora_A, lora_B, None)  # autocast off again

"""minipeft.fused (RMSNorm, RoPE, SwiGLU, cross-entropy with hand-derived backward passes) against
float64 autograd of the eager formulas, torch.autograd.gradcheck, transformers' LlamaRMSNorm and
apply_rotary_pos_emb, eager autograd bit for bit (SwiGLU), and torch's cross_entropy; odd shapes,
strided inputs, bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minipeft.fused import cross_entropy_sum, rms_norm, rope, swiglu
from minipeft.model import apply_rope, rope_cos_sin

# Normwise max|got - ref| / max|ref| against float64: float32 differs by rounding and summation order
# (~1e-7 seen), so 1e-5 has ~100x margin and still catches a wrong sign, power or missing term (O(1e-1)).
# bf16 is compared with eager autograd of the same formula in bf16: both round to bf16's step (2^-8),
# in different places, so 2^-6 relative; a wrong formula is off by O(1).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2 ** -6}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def grads(fn, inputs, grad_out):
    """[fn(*inputs)] + the gradient of <y, grad_out> for every input that requires grad."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*leaves)
    y.backward(grad_out.to(y.dtype))
    return [y] + [t.grad for t in leaves if t.requires_grad]


def eager_rms_norm(x, w, eps):
    """Hugging Face's LlamaRMSNorm, written out: float32 statistics, cast back, times w."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 2), (7, 33), (2, 5, 64), (3, 1, 4, 17)])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-w", "trained-w"])
def test_rms_norm_matches_float64_autograd(dtype, shape, train_weight):
    """Output and gradients (x; w when it trains, as in full fine-tuning) equal float64 autograd of the
    eager formula; a large-scale x (|x| ~ 1e3) keeps eps negligible, a small one (~1e-3) makes it matter."""
    g = torch.Generator().manual_seed(0)
    for scale in (1e3, 1e-3):
        x = (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()
        w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_(train_weight)
        grad_out = torch.randn(*shape, generator=g)
        want = grads(lambda x, w: eager_rms_norm(x, w, 1e-6), [x.double(), w.double()], grad_out.double())
        got = grads(lambda x, w: rms_norm(x, w, 1e-6), [x, w], grad_out)
        assert len(got) == len(want) == 2 + train_weight
        for name, a, b in zip(["y", "dx", "dw"], got, want):
            assert a.dtype == dtype and a.shape == b.shape, name
            assert rel_err(a, b) <= TOL[dtype], (name, scale, rel_err(a, b))


def test_rms_norm_gradcheck_and_strided_input():
    x = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    xt = torch.randn(9, 4, 3, dtype=torch.float64).transpose(0, 2)  # (3, 4, 9), not contiguous
    torch.testing.assert_close(rms_norm(xt, w, 1e-5), eager_rms_norm(xt, w, 1e-5), rtol=0, atol=1e-14)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=["w-bf16", "w-f32"])
def test_rms_norm_bf16_as_eager_autograd(wdtype):
    """bf16 x with a bf16 or float32 weight (output then float32, as HF): the dtypes of the output and of
    each gradient are eager autograd's, the values equal within bf16 rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 40, generator=g).bfloat16().requires_grad_()
    w = (1 + 0.3 * torch.randn(40, generator=g)).to(wdtype).requires_grad_()
    grad_out = torch.randn(4, 6, 40, generator=g)
    want = grads(lambda x, w: eager_rms_norm(x, w, 1e-6), [x, w], grad_out)
    got = grads(lambda x, w: rms_norm(x, w, 1e-6), [x, w], grad_out)
    for name, a, b in zip(["y", "dx", "dw"], got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= TOL[torch.bfloat16], (name, rel_err(a, b))


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.2)
    x = torch.randn(2, 11, 48, requires_grad=True)
    grad_out = torch.randn(2, 11, 48)
    want = grads(ref, [x], grad_out)
    got = grads(lambda x: rms_norm(x, ref.weight.detach(), 1e-5), [x], grad_out)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL[torch.float32]


def eager_rope(x, cos, sin):
    """Hugging Face's rotate_half form, on cos/sin repeated twice along the last dim."""
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B,H,T,hd", [(1, 1, 1, 2), (2, 3, 7, 10), (2, 4, 33, 64)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
def test_rope_matches_float64_autograd(dtype, B, H, T, hd, strided):
    """Output and dx equal float64 autograd of the rotate_half formula, for q as the model makes it (a
    (B, T, H, hd) projection viewed as (B, H, T, hd)) or contiguous; the output keeps x's layout."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, H, hd, generator=g).transpose(1, 2) if strided else torch.randn(B, H, T, hd, generator=g)
    x = x.to(dtype).requires_grad_()
    pos = torch.randint(0, 5000, (B, T), generator=g)
    cos, sin = rope_cos_sin(pos, hd, 10000.0, dtype)
    grad_out = torch.randn(B, H, T, hd, generator=g)
    want = grads(lambda x: eager_rope(x, cos[:, None].double(), sin[:, None].double()), [x.double()],
                 grad_out.double())
    got = grads(lambda x: apply_rope(x, cos, sin), [x], grad_out)
    assert got[0].stride() == x.stride()
    for name, a, b in zip(["y", "dx"], got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= TOL[dtype], (name, rel_err(a, b))


def test_rope_gradcheck_bf16_and_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 1, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: rope(x, angles.cos(), angles.sin()), (x,))
    # transformers rotates q and k with (B, T, hd) cos/sin, halves repeated
    q, k = torch.randn(2, 4, 9, 16, requires_grad=True), torch.randn(2, 2, 9, 16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(9).expand(2, 9), 16, 500000.0, torch.float32)
    want_q, want_k = apply_rotary_pos_emb(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    assert rel_err(apply_rope(q, cos, sin), want_q) <= TOL[torch.float32]
    assert rel_err(apply_rope(k, cos, sin), want_k) <= TOL[torch.float32]
    # bf16: against eager autograd in bf16
    xb = torch.randn(2, 4, 9, 16).bfloat16().requires_grad_()
    cb, sb = cos.bfloat16(), sin.bfloat16()
    grad_out = torch.randn(2, 4, 9, 16)
    for a, b in zip(grads(lambda x: apply_rope(x, cb, sb), [xb], grad_out),
                    grads(lambda x: eager_rope(x, cb[:, None], sb[:, None]), [xb], grad_out)):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) <= TOL[torch.bfloat16]


def eager_swiglu(a, u):
    return F.silu(a) * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (2, 33, 129)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "gate", "up"])
def test_swiglu_equals_eager_autograd_bitwise(dtype, shape, needs):
    """Output and gradients equal eager autograd of silu(a) * u exactly (the same operations in the same
    order), and float64 closed forms (σ written out: an independent spec) within TOL; a transposed gate."""
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(*shape[::-1], generator=g) * 4).to(dtype).permute(*range(len(shape) - 1, -1, -1))
    u = torch.randn(*shape, generator=g).to(dtype)
    a, u = a.requires_grad_(needs[0]), u.requires_grad_(needs[1])
    grad_out = torch.randn(*shape, generator=g)
    got, want = grads(swiglu, [a, u], grad_out), grads(eager_swiglu, [a, u], grad_out)
    assert len(got) == len(want) == 1 + sum(needs)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype == dtype and torch.equal(x, y)
    ad, ud, gd = a.detach().double(), u.detach().double(), grad_out.to(dtype).double()
    sig = torch.sigmoid(ad)
    closed = [ad * sig * ud] + [t for t, n in zip([gd * ud * sig * (1 + ad * (1 - sig)), gd * ad * sig], needs) if n]
    if dtype != torch.bfloat16:  # bf16 rounds each intermediate, as eager does (checked bitwise above)
        for name, x, y in zip(["h", "d1", "d2"], got, closed):
            assert rel_err(x, y) <= TOL[dtype], (name, rel_err(x, y))


def test_swiglu_gradcheck_memory_retained_graph_and_errors():
    a = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (a, u))
    saved = []  # what the backward keeps: a and u, not silu(a) as well
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = swiglu(a, u)
    eager = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: eager.append(t) or t, lambda t: t):
        eager_swiglu(a, u)
    assert len(saved) == 2 and len(eager) == 3
    first = torch.autograd.grad(h.sum(), (a, u), retain_graph=True)
    for x, y in zip(torch.autograd.grad(h.sum(), (a, u)), first):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(a, u[:, :1])
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(a, u.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("N,V", [(1, 2), (13, 37), (64, 1000)])
def test_cross_entropy_sum_matches_torch(dtype, N, V):
    """Loss and d logits equal float64 F.cross_entropy(reduction="sum") on the same logits (bf16: its
    float32 loss, gradient rounded once to bf16); repeated targets and extreme logits included."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(N, V, generator=g) * 8).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[: N // 2] = targets[0]
    want = grads(lambda z: F.cross_entropy(z, targets, reduction="sum"), [logits.double()], torch.tensor(0.7))
    got = grads(lambda z: cross_entropy_sum(z, targets), [logits], torch.tensor(0.7))
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype
    tol = {torch.bfloat16: 2 ** -8}.get(dtype, TOL[dtype])  # bf16 logits are exact inputs; only dz rounds
    for name, a, b in zip(["loss", "dz"], got, want):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


def test_cross_entropy_sum_gradcheck_empty_batch_and_retained_graph():
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda z: cross_entropy_sum(z, t), (z,))
    empty = torch.zeros(0, 7, requires_grad=True)  # a batch with nothing scored
    loss = cross_entropy_sum(empty, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == (0, 7)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = cross_entropy_sum(z, t)
    logp = next(x for x in saved if x.shape == z.shape)
    first = torch.autograd.grad(loss, z, retain_graph=True)[0]  # a new tensor: ℓ is kept for the next
    last = torch.autograd.grad(loss, z)[0]  # the graph is not kept: the gradient takes ℓ's buffer
    assert first.data_ptr() != logp.data_ptr() and last.data_ptr() == logp.data_ptr()
    torch.testing.assert_close(last, first, rtol=0, atol=0)


def _pair_rope(z):
    """rope on z (N, 12) viewed as (N, 3, 4): T = 3 positions of head_dim 4, fixed angles."""
    angles = torch.linspace(-2.0, 3.0, 6, dtype=z.dtype).view(3, 2)
    return z.view(-1, 3, 4), angles.cos(), angles.sin()


# (ours, eager float64 spec) of each Function on z (N, 12); a scalar out of each for the first gradient
SECOND_ORDER = {
    "rms_norm": (lambda z, w: (rms_norm(z, w, 1e-6) * w).sum(),
                 lambda z, w: (eager_rms_norm(z, w, 1e-6) * w).sum()),
    "rope": (lambda z, w: (rope(*_pair_rope(z)).reshape(z.shape) ** 2 * w).sum(),
             lambda z, w: (eager_rope(*_pair_rope(z)).reshape(z.shape) ** 2 * w).sum()),
    "swiglu": (lambda z, w: (swiglu(z[:, :6], z[:, 6:]) * w[:6]).sum(),
               lambda z, w: (eager_swiglu(z[:, :6], z[:, 6:]) * w[:6]).sum()),
    "cross_entropy": (lambda z, w: cross_entropy_sum(z * w, torch.tensor([0, 11, 5])),
                      lambda z, w: F.cross_entropy(z * w, torch.tensor([0, 11, 5]), reduction="sum")),
}


@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_create_graph_is_exact_or_refused(name):
    """A gradient penalty: z = x A, g = ∂L/∂A with create_graph=True, then ∂|g|²/∂x, against float64 eager
    autograd. RoPE's backward is itself a rotation: exact. The others' backward passes read statistics
    (r, log-softmax) the forward kept without a graph, so a recorded backward treats them as constants:
    a silently wrong second derivative. They must refuse create_graph instead."""
    ours, eager = SECOND_ORDER[name]
    g = torch.Generator().manual_seed(6)
    x0, a0 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(12, generator=g, dtype=torch.float64)

    def penalty_grad(fn):
        x, a = x0.clone().requires_grad_(), a0.clone().requires_grad_()
        (ga,) = torch.autograd.grad(fn(x @ a, w), a, create_graph=True)
        return torch.autograd.grad(ga.pow(2).sum(), x)[0]

    want = penalty_grad(eager)
    if name != "rope":
        with pytest.raises(RuntimeError, match="once differentiable"):
            penalty_grad(ours)
        x = x0.clone().requires_grad_()  # a first-order backward is unaffected
        (got,) = torch.autograd.grad(ours(x @ a0, w), x)
        (want,) = torch.autograd.grad(eager(x @ a0, w), x)
    else:
        got = penalty_grad(ours)
    assert rel_err(got, want) <= TOL[torch.float64]


def test_rope_refuses_cos_sin_wider_than_x():
    """cos/sin broadcast against x's leading dims; ones wider than x (a batch of angles for one row of x)
    would make the eager formula's output wider than x, which the rotation cannot write into x's shape."""
    x = torch.randn(1, 2, 3, 4)
    angles = torch.randn(2, 1, 3, 2)
    with pytest.raises(ValueError, match="broadcast"):
        rope(x, angles.cos(), angles.sin())
    assert rope(x, angles[:1].cos(), angles[:1].sin()).shape == x.shape  # broadcasting up to x's shape is fine

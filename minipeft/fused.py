"""The decoder's memory-bound steps with hand-derived backward passes: RMSNorm, RoPE, SwiGLU, cross-entropy.

Autograd differentiates each primitive of an eager formula on its own: RMSNorm's pow, mean, rsqrt
and two products leave five backward nodes, one of them a broadcast product that runs on a slow
strided path; each node reads and writes a whole activation. Written out by hand, each backward is
two to four passes. The forward passes compute what Hugging Face's modules compute, in the same
precision; the eager formulas are the spec (tests/test_fused.py: float64 autograd of them, and
transformers' modules).

RMSNorm, x (..., n), r = (mean(x²) + ε)^(-1/2) per row, y = w · (x r):
    ∂L/∂x = r · gw - x · r³ · mean(gw · x),   gw = g · w       (from ∂r/∂x_j = -r³ x_j / n)
    ∂L/∂w = Σ_rows g · (x r)

RoPE, x (..., T, hd) split into halves (x₁, x₂), angles θ (T, hd/2): a rotation of each pair
    y = (x₁ cos θ - x₂ sin θ,  x₂ cos θ + x₁ sin θ)
is orthogonal, so its backward is the inverse rotation, the same map at -θ: ∂L/∂x = rope(g, cos, -sin),
applied as the same Function, so that a create_graph backward is exact to any order.

SwiGLU's product, gate a and up u (..., I), silu(a) = a σ(a):
    h = silu(a) · u,   ∂L/∂u = g · silu(a),   ∂L/∂a = silu'(a) · (g · u),   silu' = σ (1 + a (1 - σ))
Autograd keeps a, silu(a) and u; this keeps a and u and recomputes silu(a) in the backward (one pass),
so each layer holds one (B, T, I) activation fewer. The same operations in the same order as autograd's:
equal bit for bit, in every dtype.

Cross-entropy summed over N rows, logits z (N, V), targets t, log-probabilities ℓ = log_softmax(z):
    L = -Σ_i ℓ[i, t_i],   ∂L/∂z = softmax(z) - onehot(t)
from the ℓ kept by the forward (float32) in two passes, exp and the scale by the incoming gradient,
plus the N target entries; torch's nll_loss + log_softmax backward zero-fill an (N, V) gradient first.
The backward writes the gradient over ℓ's buffer (one (N, V) float32 tensor fewer at its start)
unless the graph is retained; a 16-bit input's float32 copy takes ℓ in place.

RMSNorm, SwiGLU and cross-entropy are once differentiable: their backward passes read what the forward
computed without a graph (r, ℓ), so autograd recording them (create_graph=True) would differentiate
as if those were constants, a silently wrong second derivative (a gradient penalty, say). They refuse
create_graph=True (_first_order). torch's once_differentiable would not do: it errs only where the
incoming gradient has a graph, which misses the gradient's dependence on the inputs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _first_order(backward):
    """backward, refusing create_graph=True: what it would record is not the derivative of the gradient."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # the engine runs backward with grad mode on iff create_graph=True
            raise RuntimeError("minipeft.fused: this backward is once differentiable, and create_graph=True "
                               "would record a wrong derivative of it; use the eager formula for higher "
                               "derivatives (the module docstring)")
        return backward(ctx, *grads)
    return wrapper


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is: 16-bit statistics would lose the small terms."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = _wide(x)  # float32 statistics, as Hugging Face's LlamaRMSNorm, then cast back
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    @_first_order
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xf = _wide(x)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = _wide((g * weight).to(x.dtype))  # the gradient of (x r) in its own dtype, as autograd rounds it
            m = (gw * xf).mean(-1, keepdim=True)
            dx = gw.mul_(r).addcmul_(xf, r.pow(3) * m, value=-1).to(x.dtype)  # in place: gw is a new tensor
        if ctx.needs_input_grad[1]:
            dw = (g * (xf * r).to(x.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w · x / sqrt(mean(x²) + ε) over the last dim, statistics in float32 (float64 stays); x (..., n),
    weight (n,). The output has w · x's dtype, as in Hugging Face's LlamaRMSNorm."""
    return _RMSNorm.apply(x, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x₁ cos - x₂ sin, x₂ cos + x₁ sin), written into the halves of one output: two passes."""
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # a compiler fuses the formula itself and cannot lower out= views
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    y = torch.empty_like(x)  # x's strides: a transposed (B, H, T, hd) view stays one
    y1, y2 = y.chunk(2, dim=-1)
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _Rope.apply(g, cos, -sin), None, None  # the Function itself: its own backward is recorded


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+hd/2}) of x (..., T, hd) by its angle; cos, sin (..., T, hd/2)
    broadcast against x's leading dims. cos and sin do not get gradients."""
    half = (*x.shape[:-1], x.shape[-1] // 2)
    if torch.broadcast_shapes(half, cos.shape, sin.shape) != half:  # out= would resize: a detached, garbage y
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must broadcast to x's "
                         f"{tuple(x.shape)} with the last dim halved, {half}")
    return _Rope.apply(x, cos, sin)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # in place: silu(a) is not kept

    @staticmethod
    @_first_order
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        dgate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None  # silu' · (g · u)
        dup = F.silu(gate).mul_(g) if ctx.needs_input_grad[1] else None
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, holding gate and up but not silu(gate) for the backward; gate and up (..., I)
    of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must have one shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    return _SwiGLU.apply(gate, up)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        wide = _wide(logits)
        # (N, V); a 16-bit input's float32 copy is ours to overwrite, a float32 input is the caller's
        logp = torch.log_softmax(wide, dim=-1, out=None if wide is logits else wide)
        ctx.save_for_backward(logp, targets)
        ctx.logits_dtype = logits.dtype
        return -logp.gather(1, targets[:, None]).sum()

    @staticmethod
    @_first_order
    def backward(ctx, g):
        logp, targets = ctx.saved_tensors
        # softmax, in the saved buffer unless a retained graph will run backward again (as AOTAutograd decides)
        grad = logp.exp() if torch._C._autograd._get_current_graph_task_keep_graph() else logp.exp_()
        grad[torch.arange(len(targets), device=grad.device), targets] -= 1
        return grad.mul_(g).to(ctx.logits_dtype), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-Σ_i log softmax(logits_i)[targets_i], computed in float32 (float64 stays); logits (N, V),
    targets (N,) int64 ids in [0, V). The gradient has logits' dtype."""
    return _CrossEntropySum.apply(logits, targets)

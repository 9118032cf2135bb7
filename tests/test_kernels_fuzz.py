"""Seeded randomized test of the Triton kernels (fused LoRA, QLoRA, NF4 dequantization) on odd shapes.

tests/test_kernels_lora.py and tests/test_kernels_nf4.py pin hand-picked cases; here a fixed seed draws
the settings they leave out: M of 1, 2, 3, 17, 129 rows or leading dims (B, T) with T odd; K and N
that are multiples of no block (1, 5, 63, 65, 200); r of 1, 3, 16, 64 and 128 (MAX_RANK); bias on or
off; dropout p in {0, 0.1, 0.9}; x and W in float32, bfloat16 or float16 with adapters float32 or the same
dtype; x a transposed or sliced view; scaling 0, negative or positive; U in the K loop or precomputed;
NF4 fused or dequantized first, blocksize 64 or 128, double quant or not. Each draw runs through the
public dispatch forced to the kernels (its problem check must accept every draw) and through the
eager twin, forward and backward, and both are compared with float64 autograd of
    y = x W^T + b + s ((x * Delta) A^T) B^T      (Delta = mask / (1 - p))
on the same inputs and mask: y, dx, dA, dB, dbias (W frozen, as in LoRA).

Error measure: max|got - ref| / max|ref_abs| per tensor, ref_abs the same float64 autograd run on |x|, |W|,
|b|, |A|, |B|, |s| and |grad|: every sum of the formula and of its gradients taken over |terms|. A
rounding of an intermediate value v costs up to u |v| <= u ref_abs, whatever cancels afterwards (dx of
M = K = 1 is one element, a sum of 65 O(1) terms that came to 0.04: max|ref| was no scale for the error
of its rounded O(1) terms). Where ref_abs is all zero (dA, dB at s = 0 or all dropped) got must be 0.
Tolerances, u the unit roundoff of the compute dtype (worst seen over 400 draws in brackets):
  float32 (u = 2^-24): only the summation order differs, float32 dots of length L <= K + r <= 328 erring
    by ~sqrt(L) u (18 u) typically, L u at worst. TOL 64 u = 2^-18 [2.6 u].
  bfloat16 (u = 2^-9) and float16 (u = 2^-11): float32 accumulation, so what counts is the roundings to
    the 16-bit dtype, u ref_abs each at most: the kernel rounds D(x), float32 adapters' tiles, U and the
    output (in the backward G B, A's tiles, dx); the twin rounds x W^T, U, U B^T, s U B^T and the sum
    (and G B, its products). At most ~8 on either path, none in the float64 reference: TOL 16 u, 2^-5 for
    bfloat16 [4.2 u], 2^-7 for float16 [1.8 u]; a wrong tile, mask or scale errs by O(1).
NF4 draws also check the dequantization kernel bit for bit against minipeft.nf4 on those odd shapes.
The kernel is also compared with the twin, at the sum of their tolerances against the reference (2 TOL).
Runs on Triton's interpreter without CUDA (TRITON_INTERPRET=1 for this module, as the other kernel
tests); the interpreter is slow, so shapes stay small and the draws few (200 draws: 48 s on 2 CPUs).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from interpreted import DEVICE, _interpreter, klora, knf4  # noqa: F401 (_interpreter: an autouse fixture)
from minipeft import functional as MF
from minipeft import nf4


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: 64 * 2 ** -24, BF16: 16 * 2 ** -9, F16: 16 * 2 ** -11}
LEADING = [(1,), (2,), (3,), (17,), (129,), (2, 3), (3, 5), (1, 7)]  # x's leading dims; M is their product
SIZES = [1, 5, 63, 65, 200]  # K and N
RANKS = [1, 3, 16, 64, 128]
SEED = 20240611
DRAWS = 150  # LoRA draws; NF4 draws are a third of that (about 0.4 s a draw on the interpreter)


@dataclass(frozen=True)
class Case:
    lead: tuple
    k: int
    n: int
    r: int
    bias: bool
    p: float
    dtype: torch.dtype
    lora_dtype: torch.dtype
    x_view: str  # "contiguous", "transposed" (x is y.mT of a (..., K, T) tensor), "sliced" (every other column)
    scaling: float
    in_loop: bool  # U = D(x) A^T in the kernel's K loop, or precomputed
    nf4: Optional[tuple] = None  # (blocksize, double quant, fused) for a QLoRA draw

    def __str__(self) -> str:
        q = "" if self.nf4 is None else "-nf4bs{}{}{}".format(self.nf4[0], "-dq" if self.nf4[1] else "",
                                                                "-fused" if self.nf4[2] else "-dequant")
        return (f"x{'x'.join(map(str, self.lead))}-K{self.k}-N{self.n}-r{self.r}-{'bias' if self.bias else 'nobias'}"
                f"-p{self.p}-{str(self.dtype)[6:]}-lora_{str(self.lora_dtype)[6:]}-{self.x_view}-s{self.scaling:g}"
                f"-{'inloop' if self.in_loop else 'precomputed'}{q}")


def draw_cases(rng: random.Random, count: int, qlora: bool) -> list[Case]:
    """`count` cases; large shapes are capped so one draw stays within a few interpreter seconds: the
    interpreter's cost grows with the number of 32 x 32 x 32 tiles, M N K / 32^3 (and r for the epilogue)."""
    cases = []
    while len(cases) < count:
        lead, k, n, r = rng.choice(LEADING), rng.choice(SIZES), rng.choice(SIZES), rng.choice(RANKS)
        m = math.prod(lead)
        if m * k * n > 129 * 65 * 65 or (m >= 17 and k * n >= 200 * 63):
            continue
        dtype = rng.choice([F32, BF16, F16])
        nf4_settings = (rng.choice([64, 128]), rng.random() < 0.5, rng.random() < 0.5) if qlora else None
        cases.append(Case(lead, k, n, r, rng.random() < 0.5, rng.choice([0.0, 0.1, 0.9]), dtype,
                          rng.choice([F32, dtype]), rng.choice(["contiguous", "transposed", "sliced"]),
                          rng.choice([0.0, -0.5, -16 / r ** 0.5, 2.0]), rng.random() < 0.5, nf4_settings))
    return cases


def _view(x: torch.Tensor, how: str) -> torch.Tensor:
    """x's values as a non-contiguous view: the transpose of a contiguous (..., K, T) copy, or every
    other column of a (..., 2K) tensor (K stride 2) whose other columns are NaN, so reading them shows."""
    if how == "transposed":
        return x.mT.contiguous().mT
    if how == "sliced":
        return torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2)[..., ::2]
    return x


def make_inputs(case: Case, seed: int):
    """x (contiguous; `check` takes the case's view of it inside autograd, as clone() would make a strided
    leaf contiguous), W (dense, or NF4 with W the spec's dequantized weight), bias, A, B: every term O(1)."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0, dt=case.dtype: (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)
    x = t(*case.lead, case.k)
    w = t(case.n, case.k, scale=case.k ** -0.5)
    q = None if case.nf4 is None else nf4.quantize_nf4(w, blocksize=case.nf4[0], double_quant=case.nf4[1])
    if q is not None:
        w = nf4.dequantize_nf4(q, case.dtype)
    b = t(case.n) if case.bias else None
    lora_A = t(case.r, case.k, scale=case.k ** -0.5, dt=case.lora_dtype)
    lora_B = t(case.n, case.r, scale=case.r ** -0.5, dt=case.lora_dtype)
    return x, w, q, b, lora_A, lora_B


def run(fn, inputs, grad_out):
    """[fn(*inputs)] + the gradients w.r.t. the inputs other than W (index 1) that are not None."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    y.backward(grad_out.to(y.dtype))
    return [y] + [t.grad for i, t in enumerate(leaves) if t is not None and i != 1]


def err(got: torch.Tensor, ref: torch.Tensor, size: torch.Tensor) -> float:
    """max|got - ref| / max(size), size the reference over |terms|; where that is all zero (s = 0, or
    everything dropped, for dA and dB), 0 if got is exactly ref, else inf."""
    diff = (got.double() - ref).abs().max().item()
    scale = size.abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def check(case: Case, seed: int, monkeypatch) -> None:
    x, w, q, b, lora_A, lora_B = make_inputs(case, seed)
    torch.manual_seed(seed)
    mask, keep = MF.dropout_mask(x, case.p, training=True)  # the mask lora_linear draws after this seed
    lead = x.shape[:-1]
    grad_out = torch.randn(*lead, case.n, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    s = case.scaling

    def reference(x, w, b, a, bb, s=s):
        x_lora = x if mask is None else x * mask * keep
        y = x @ w.T + ((x_lora @ a.T) @ bb.T) * s
        return y if b is None else y + b

    # The public dispatch, forced to the kernels: its problem check must accept every draw. U's route
    # and the NF4 route are picked through the thresholds the kernel module reads at each call.
    monkeypatch.setattr(klora, "XA_IN_LOOP_MAX_M", 10 ** 9 if case.in_loop else -1)
    if q is not None:
        monkeypatch.setattr(klora, "NF4_FUSED_MAX_M", 10 ** 9 if case.nf4[2] else -1)

    def kernel(x, w, b, a, bb):
        x = _view(x, case.x_view)
        torch.manual_seed(seed)
        with MF.use_kernels("triton"):
            if q is None:
                return MF.lora_linear(x, w, b, a, bb, s, dropout=case.p, training=True)
            return MF.nf4_lora_linear(x, q, b, a, bb, s, dropout=case.p, training=True)

    twin = (lambda x, w, b, a, bb: MF.lora_linear_torch(_view(x, case.x_view), w if q is None else q, b, a, bb, s,
                                                        mask, keep))
    if q is not None:
        with MF.use_kernels("triton"):
            dense = MF.dequantize_nf4(q, case.dtype)
        assert torch.equal(dense.view(torch.int16 if case.dtype != F32 else torch.int32),
                           w.view(torch.int16 if case.dtype != F32 else torch.int32)), (str(case), "dequantize")
    inputs = (x, w, b, lora_A, lora_B)
    want = run(reference, [None if t is None else t.double() for t in inputs], grad_out.double())
    # The same sums over |terms| (every product of the formula and of its gradients taken in absolute
    # value): the scale of the rounding errors, whatever cancels in the result (module docstring).
    size = run(lambda *t: reference(*t, s=abs(s)), [None if t is None else t.double().abs() for t in inputs],
               grad_out.double().abs())
    got_k, got_t = run(kernel, inputs, grad_out), run(twin, inputs, grad_out)
    names = ["y", "dx"] + (["dbias"] if case.bias else []) + ["dA", "dB"]
    tol = TOL[case.dtype]
    for name, k_val, t_val, ref, scale in zip(names, got_k, got_t, want, size):
        assert k_val.shape == t_val.shape == ref.shape and k_val.dtype == t_val.dtype, (str(case), name)
        assert torch.isfinite(k_val).all(), (str(case), name, "kernel not finite")
        assert err(k_val, ref, scale) <= tol, (str(case), name, "kernel", err(k_val, ref, scale))
        assert err(t_val, ref, scale) <= tol, (str(case), name, "twin", err(t_val, ref, scale))
        assert err(k_val, t_val.double(), scale) <= 2 * tol, (str(case), name, "kernel vs twin")


LORA_CASES = draw_cases(random.Random(SEED), DRAWS, qlora=False)
NF4_CASES = draw_cases(random.Random(SEED + 1), DRAWS // 3, qlora=True)


@pytest.mark.parametrize("index,case", list(enumerate(LORA_CASES + NF4_CASES)), ids=lambda v: str(v))
def test_kernels_match_twin_and_float64(index, case, monkeypatch):
    check(case, SEED + index, monkeypatch)


def test_draws_cover_the_settings():
    """The seed's draws do reach every value listed in the module docstring."""
    cases = LORA_CASES + NF4_CASES
    for attr, values in (("k", SIZES), ("n", SIZES), ("r", RANKS), ("p", [0.0, 0.1, 0.9]),
                         ("dtype", [F32, BF16, F16]), ("x_view", ["contiguous", "transposed", "sliced"]),
                         ("bias", [True, False]), ("in_loop", [True, False])):
        assert {getattr(c, attr) for c in cases} >= set(values), attr
    assert {c.scaling for c in cases} & {0.0} and min(c.scaling for c in cases) < 0
    assert {c.lead for c in cases} >= {(1,), (2,), (3,), (17,), (129,)} and any(len(c.lead) > 1 for c in cases)
    assert {c.nf4 for c in NF4_CASES} >= {(bs, dq, fused) for bs in (64, 128) for dq in (True, False)
                                          for fused in (True, False)}


@pytest.mark.parametrize("k,n", [(0, 5), (5, 0)], ids=["K0", "N0"])
@pytest.mark.parametrize("in_loop", [True, False], ids=["inloop", "precomputed"])
def test_empty_in_or_out_features(k, n, in_loop):
    """in_features 0 (nn.Linear allows it: y = b) or out_features 0, forward and backward equal to the twin.
    With K = 0 the kernel path flattened x by reshape(-1, 0), which cannot infer the rows, and raised."""
    g = torch.Generator().manual_seed(0)
    x, w, b, lora_A, lora_B = (torch.randn(*s, generator=g).to(DEVICE) for s in ((2, 3, k), (n, k), (n,), (4, k), (n, 4)))
    mask = torch.ones(2, 3, k, dtype=torch.bool, device=DEVICE)
    grad_out = torch.randn(2, 3, n, generator=g).to(DEVICE)
    kernel = run(lambda x, w, b, a, bb: klora.lora_linear(x, w, b, a, bb, 2.0, mask, 2.0, xa_in_loop=in_loop),
                 (x, w, b, lora_A, lora_B), grad_out)
    twin = run(lambda x, w, b, a, bb: MF.lora_linear_torch(x, w, b, a, bb, 2.0, mask, 2.0),
               (x, w, b, lora_A, lora_B), grad_out)
    for name, got, want in zip(["y", "dx", "dbias", "dA", "dB"], kernel, twin):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), name

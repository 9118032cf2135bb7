"""The fused LoRA kernel (minipeft.kernels.lora) and the dispatch of minipeft.functional.lora_linear.

Every case runs forward and backward through the kernel and through the eager twin, and compares both with
an independent reference: plain float64 autograd of y = x W^T + b + s ((x * Delta) A^T) B^T on the same
inputs and dropout mask. Without CUDA the kernels run on Triton's interpreter, TRITON_INTERPRET=1 being set
for this module only (minipeft.kernels.triton_interpreter); with CUDA they run compiled on the GPU.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interpreted import DEVICE, _interpreter, klora  # noqa: F401 (_interpreter: an autouse fixture)
from minipeft import functional as MF


F32, BF16 = torch.float32, torch.bfloat16
# Normwise tolerance max|got - ref| / max|ref|, against the float64 reference.
# float32: the only error is summation order over at most ~130 terms of O(1) size, ~1e-7 observed;
#   1e-5 leaves 100x margin yet catches any wrong tile, mask, scale or transpose (errors of O(1e-1)).
# bfloat16 (8 significant bits, unit roundoff 2^-9): each rounding of an O(max) value costs up to 2^-9 of
#   max|ref|. The twin rounds y, the LoRA term, s*term and their sum (+ U, and float32 adapters' input);
#   the kernel rounds D(x), the adapters' tiles, U and the output once each. Observed <= 5.2e-3 for both;
#   2^-6 = 1.6e-2 leaves 3x margin, while a dropped or misplaced LoRA term (O(1) here) is far outside it.
TOL = {F32: 1e-5, BF16: 2 ** -6}

# M, K, N, r, bias, dropout p, dtype, lora dtype, U in the K loop. Shapes straddle the 32-wide interpreter
# tiles (and the GPU tiles), r covers the padding of 1/8 to 16 and 64, every flag appears with each dtype.
CASES = [
    (1, 33, 40, 8, True, 0.0, F32, F32, True),
    (3, 64, 45, 1, False, 0.0, F32, F32, True),
    (37, 45, 70, 16, True, 0.25, F32, F32, True),
    (130, 40, 33, 64, True, 0.0, F32, F32, False),
    (37, 31, 64, 8, False, 0.5, F32, F32, False),
    (1, 40, 33, 16, True, 0.0, BF16, BF16, True),
    (37, 33, 64, 64, False, 0.25, BF16, BF16, True),
    (130, 64, 45, 1, True, 0.0, BF16, BF16, False),
    (3, 45, 31, 8, True, 0.1, BF16, F32, True),
    (130, 70, 40, 16, True, 0.5, BF16, F32, False),
]


def _case_id(case) -> str:
    m, k, n, r, bias, p, dtype, lora_dtype, in_loop = case
    return (f"M{m}-K{k}-N{n}-r{r}-{'bias' if bias else 'nobias'}-p{p}-{str(dtype)[6:]}-lora_{str(lora_dtype)[6:]}"
            f"-{'inloop' if in_loop else 'precomputed'}")


def make_inputs(m, k, n, r, bias, dtype, lora_dtype, seed=0):
    """x ~ N(0,1) and weights scaled so every term of y is O(1): the LoRA term is as large as the base.
    Also seeds torch's global RNG, which draws the dropout masks."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0, dt=dtype: (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)
    x = t(m, k)
    weight = t(n, k, scale=k ** -0.5)
    b = t(n) if bias else None
    lora_A = t(r, k, scale=k ** -0.5, dt=lora_dtype)
    lora_B = t(n, r, scale=r ** -0.5, dt=lora_dtype)
    return x, weight, b, lora_A, lora_B


def reference(x, weight, bias, lora_A, lora_B, scaling, mask=None, keep=1.0):
    """The formula itself, written independently of both paths (the tests run it in float64)."""
    x_lora = x if mask is None else x * mask * keep
    y = x @ weight.T + ((x_lora @ lora_A.T) @ lora_B.T) * scaling
    return y if bias is None else y + bias


def grads(fn, inputs, grad_out, trainable=None):
    """[fn(*inputs)] + the gradients of <fn(*inputs), grad_out> w.r.t. the inputs that are not None, or
    only w.r.t. those whose index is in `trainable` (the others stay constants)."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(trainable is None or i in trainable)
              for i, t in enumerate(inputs)]
    y = fn(*leaves)
    y.backward(grad_out.to(y.dtype))
    return [y] + [t.grad for t in leaves if t is not None and t.requires_grad]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_match_reference(case):
    m, k, n, r, bias, p, dtype, lora_dtype, in_loop = case
    x, weight, b, lora_A, lora_B = make_inputs(m, k, n, r, bias, dtype, lora_dtype)
    scaling = 16 / math.sqrt(r)  # rsLoRA-style, != 1
    mask, keep = MF.dropout_mask(x, p, training=True)
    grad_out = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs = (x, weight, b, lora_A, lora_B)

    ref = grads(lambda *t: reference(*t, scaling, mask, keep), [None if t is None else t.double() for t in inputs],
                grad_out.double())
    kernel = grads(lambda *t: klora.lora_linear(*t, scaling, mask, keep, xa_in_loop=in_loop), inputs, grad_out)
    twin = grads(lambda *t: MF.lora_linear_torch(*t, scaling, mask, keep), inputs, grad_out)
    names = ["y", "dx", "dW", "dbias", "dA", "dB"] if bias else ["y", "dx", "dW", "dA", "dB"]
    for name, got_k, got_t, want in zip(names, kernel, twin, ref):
        assert got_k.dtype == got_t.dtype, name  # gradients come in each input's own dtype
        assert rel_err(got_k, want) <= TOL[dtype], (name, rel_err(got_k, want))
        assert rel_err(got_t, want) <= TOL[dtype], (name, rel_err(got_t, want))
        assert rel_err(got_k, got_t.double()) <= TOL[dtype], (name, "kernel vs twin")


@pytest.mark.parametrize("trainable", [(0, 3, 4), (3, 4)], ids=["x-A-B", "A-B-only"])
@pytest.mark.parametrize("in_loop", [True, False], ids=["inloop", "precomputed"])
def test_frozen_base_as_in_lora_training(trainable, in_loop):
    """W and b frozen (the LoRA case): the kernel skips dW, db, and without dx the dX kernel itself."""
    x, weight, b, lora_A, lora_B = make_inputs(37, 33, 40, 8, True, F32, F32)
    mask, keep = MF.dropout_mask(x, 0.25, training=True)
    grad_out = torch.randn(37, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs = (x, weight, b, lora_A, lora_B)
    ref = grads(lambda *t: reference(*t, 2.0, mask, keep), [t.double() for t in inputs], grad_out.double(),
                trainable)
    got = grads(lambda *t: klora.lora_linear(*t, 2.0, mask, keep, xa_in_loop=in_loop), inputs, grad_out,
                trainable)
    assert len(got) == len(ref) == 1 + len(trainable)
    for g, want in zip(got, ref):
        assert rel_err(g, want) <= TOL[F32]


def test_dropout_is_applied_with_the_given_mask():
    """Guards the test above: with p > 0 the output really depends on the mask (a kernel ignoring it fails)."""
    x, weight, b, lora_A, lora_B = make_inputs(37, 45, 70, 16, True, F32, F32)
    mask, keep = MF.dropout_mask(x, 0.5, training=True)
    with_mask = klora.lora_linear(x, weight, b, lora_A, lora_B, 2.0, mask, keep)
    without = klora.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert rel_err(with_mask, without.double()) > 0.1
    assert 0.4 < mask.float().mean().item() < 0.6 and keep == 2.0


def test_leading_dims_and_empty_batch():
    x, weight, b, lora_A, lora_B = make_inputs(2 * 5, 33, 40, 8, True, F32, F32)
    x3 = x.view(2, 5, 33)
    y = klora.lora_linear(x3, weight, b, lora_A, lora_B, 0.5)
    assert y.shape == (2, 5, 40)
    want = reference(x3.double(), weight.double(), b.double(), lora_A.double(), lora_B.double(), 0.5)
    assert rel_err(y, want) <= TOL[F32]
    empty = klora.lora_linear(x3[:, :0], weight, b, lora_A, lora_B, 0.5)
    assert empty.shape == (2, 0, 40)


def test_strided_operands_bias_included():
    """Any strides: transposed views of W, A, B, a non-contiguous x, and a bias that is a strided (N,) view
    (every other element of a larger tensor), which the kernel once read as if contiguous."""
    x, weight, b, lora_A, lora_B = make_inputs(37, 33, 40, 8, True, F32, F32)
    want = reference(*(t.double() for t in (x, weight, b, lora_A, lora_B)), 2.0)
    views = (torch.stack([x, -x], 2)[:, :, 0], weight.t().contiguous().t(), torch.stack([b, -b], 1)[:, 0],
             lora_A.t().contiguous().t(), lora_B.t().contiguous().t())
    assert not any(v.is_contiguous() for v in views)
    for in_loop in (True, False):
        assert rel_err(klora.lora_linear(*views, 2.0, xa_in_loop=in_loop), want) <= TOL[F32]


def test_kernels_folder_imports_as_minipeft_kernels():
    """kernels/ is installed as minipeft.kernels (setup.cfg's package_dir). Reached as a top-level `kernels`
    (the repository root on sys.path), it hands that name to the PyPI package: the subprocess test
    test_the_folder_kernels_shadows_no_package_from_the_repository_root below. (This test asserted that find_spec
    did not find the folder, true only once transformers had imported the PyPI package: alone, it failed.)"""
    folder = Path(__file__).resolve().parent.parent / "kernels"
    assert Path(importlib.util.find_spec("minipeft.kernels").origin).parent == folder


def test_kernel_rejects_bad_operands_with_a_clear_error():
    x, weight, b, lora_A, lora_B = make_inputs(3, 33, 40, 8, True, F32, F32)
    with pytest.raises(ValueError, match=r"w: expected shape \(40, 33\)"):
        klora.lora_matmul(x, weight[:, :32], lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="r=200"):
        klora.lora_matmul(x, weight, torch.zeros(200, 33), torch.zeros(40, 200), 1.0)
    # r is read from b: a mismatch blames neither operand alone
    with pytest.raises(ValueError, match=r"the ranks of a and b disagree: a \(8, 33\) has 8 rows, b \(40, 3\) has 3"):
        klora.lora_matmul(x, weight, lora_A, lora_B[:, :3], 1.0)


def test_operands_past_int32_offsets_are_refused():
    """The kernels index in int32, which wraps silently: an operand whose elements reach past common.MAX_SPAN,
    by their count or through its strides, or an output that would, is refused by name instead of being read
    or written at wrapped offsets. Meta tensors: nothing is allocated, and the launch is never reached."""
    from minipeft.kernels import common
    meta = lambda *shape, dt=BF16: torch.empty(*shape, dtype=dt, device="meta")
    x, weight, lora_A, lora_B = meta(3, 33), meta(40, 33), meta(8, 33), meta(40, 8)
    big_x = meta(2 ** 20, 2 ** 11 + 1)  # 2**31 + 2**20 elements
    with pytest.raises(ValueError, match=rf"x: its elements span {2 ** 31 + 2 ** 20} .*\({common.MAX_SPAN}\)"):
        klora.lora_matmul(big_x, meta(40, 2 ** 11 + 1), meta(8, 2 ** 11 + 1), lora_B, 1.0)
    spread_w = meta(2 ** 32).as_strided((40, 33), (2 ** 26, 1))  # 1320 elements, 39 * 2**26 + 33 apart
    with pytest.raises(ValueError, match=rf"w: its elements span {39 * 2 ** 26 + 33} "):
        klora.lora_matmul(x, spread_w, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match=rf"out: its elements span {2 ** 32} "):  # x, w small, out (2**16, 2**16)
        klora.lora_matmul(meta(2 ** 16, 1), meta(2 ** 16, 1), meta(8, 1), meta(2 ** 16, 8), 1.0)
    with pytest.raises(ValueError, match=rf"u: its elements span {2 ** 32} "):  # U (M, r) allocated, r > N
        klora.lora_matmul(meta(2 ** 26, 1), meta(1, 1), meta(64, 1), meta(1, 64), 1.0)
    spread_mask = meta(2 ** 32, dt=torch.bool).as_strided((3, 33), (2 ** 30, 1))  # a bool operand too
    with pytest.raises(ValueError, match=rf"mask: its elements span {2 ** 31 + 33} "):
        klora.lora_matmul(x, weight, lora_A, lora_B, 1.0, mask=spread_mask)


def test_operands_past_int32_offsets_take_the_pytorch_path(kernel_calls):
    """The dispatcher knows the limit: auto (on CUDA) takes PyTorch for such operands instead of meeting
    lora_matmul's refusal, and forced triton says why it cannot (the reason auto acts on)."""
    from minipeft.kernels import common
    meta = lambda *shape: torch.empty(*shape, dtype=BF16, device="meta")
    with MF.use_kernels("triton"), pytest.raises(ValueError, match=rf"kernels cannot run: an operand of {2 ** 32} "
                                                                   rf"elements is past .*\({common.MAX_SPAN}\)"):
        MF.lora_linear(meta(2 ** 16, 1), meta(2 ** 16, 1), None, meta(8, 1), meta(2 ** 16, 8), 1.0)
    assert kernel_calls == []


def test_int32_span_limit_is_exact():
    """check_operand's limit at its edge, without memory: a view reaching exactly MAX_SPAN elements passes, one
    more is refused; an expanded (stride 0) operand spans one element however large its shape."""
    from minipeft.kernels import common
    limit = common.MAX_SPAN
    check = lambda t: common.check_operand("t", t, t.shape, None, t.device)
    base = torch.empty(limit + 1, dtype=torch.uint8, device="meta")
    check(base[:limit])
    check(base.as_strided((2, 2), (limit - 2, 1)))  # last element at offset limit - 1
    with pytest.raises(ValueError, match=rf"t: its elements span {limit + 1} in memory, more than the kernels' "
                                         rf"int32 offsets allow \({limit}\)"):
        check(base.as_strided((2, 2), (limit - 1, 1)))
    check(torch.zeros(1, 1).expand(2 ** 20, 2 ** 12))


def test_a_dimension_past_int32_is_refused_even_when_expanded():
    """x, w and a expanded (stride 0) along K each span one element in memory, but the K loop counts to
    K + BLOCK_K - 1 in int32: at K = 2**31 - 1 that wrapped negative, the loop ran no iteration, and out was
    0 instead of x w^T (seen on the interpreter). So every dimension is held to MAX_SPAN, whatever its stride."""
    from minipeft.kernels import common
    limit = common.MAX_SPAN
    k = 2 ** 31 - 1
    expanded = lambda rows, cols: torch.empty(1, 1, dtype=BF16, device="meta").expand(rows, cols)
    with pytest.raises(ValueError, match=rf"x: a dimension of {k} elements \(shape \(1, {k}\)\), more than the "
                                         rf"kernels' int32 indices allow \({limit}\)"):
        klora.lora_matmul(expanded(1, k), expanded(3, k), expanded(8, k), expanded(3, 8), 1.0)
    check = lambda t: common.check_operand("t", t, t.shape, None, t.device)
    check(expanded(2, limit))
    with pytest.raises(ValueError, match=rf"t: a dimension of {limit + 1} elements"):
        check(expanded(2, limit + 1))


def test_gpu_autotune_pruning(monkeypatch):
    """The GPU-only config pruning, run here by pretending not to interpret, with an A100's 163 KB of shared
    memory: bfloat16 keeps every config of M's regime; float32 tiles are twice as large, so only those that
    fit remain, or the smallest of the regime when none does."""
    from minipeft.kernels import common
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "_max_shared_mem", lambda device_index: 166_912)
    blocks = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in cs]
    x16, x32 = torch.empty(1, 8, dtype=BF16), torch.empty(1, 8, dtype=F32)
    prune = lambda x, m: blocks(common.prune_configs(common.MATMUL_CONFIGS, {"M": m, "x_ptr": x}, R_PAD=16))
    assert prune(x16, 1) == [(16, 32, 256), (16, 64, 128), (16, 128, 128)]
    assert prune(x16, 200) == [(32, 64, 128), (64, 64, 64), (64, 128, 64)]
    assert prune(x16, 4096) == [(64, 64, 64), (64, 128, 64), (128, 128, 64), (128, 64, 64)]
    assert prune(x32, 200) == [(64, 64, 64)]
    assert prune(x32, 16) == [(16, 64, 128)]  # nothing fits: the smallest of the regime


def test_kernels_compile_for_the_gpu():
    """The interpreter runs kernels as Python and accepts code Triton's compiler would reject: compile one
    variant per code path for sm_90 through the real pipeline down to ptxas (minipeft.kernels.aot), in a
    process without the interpreter flag."""
    import triton.backends.nvidia  # noqa: F401
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "minipeft.kernels.aot", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 4 kernels for sm_90" in proc.stdout


# --- dispatch -------------------------------------------------------------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the kernel entry point that functional.lora_linear dispatches to."""
    calls = []
    real = klora.lora_linear

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(klora, "lora_linear", spy)
    monkeypatch.delenv(MF.ENV_VAR, raising=False)
    return calls


@pytest.mark.skipif(DEVICE == "cuda", reason="auto picks PyTorch only for CPU tensors")
def test_auto_picks_pytorch_on_cpu_and_triton_forces_the_kernel(kernel_calls):
    x, weight, b, lora_A, lora_B = make_inputs(37, 45, 70, 16, True, F32, F32)
    auto = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)  # the merged form (test_lora_merged)
    assert kernel_calls == []
    assert rel_err(auto, MF.lora_linear_torch(x, weight, b, lora_A, lora_B, 2.0).double()) <= TOL[F32]
    with MF.use_kernels("triton"):
        forced = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert len(kernel_calls) == 1
    assert rel_err(forced, auto.double()) <= TOL[F32]
    assert MF.kernel_mode() == "auto"  # the context manager restored the previous mode


def test_environment_variable_and_override(kernel_calls, monkeypatch):
    x, weight, b, lora_A, lora_B = make_inputs(3, 33, 40, 8, False, F32, F32)
    monkeypatch.setenv(MF.ENV_VAR, "triton")
    MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert len(kernel_calls) == 1
    with MF.use_kernels("torch"):  # the override wins over the environment
        MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert len(kernel_calls) == 1
    monkeypatch.setenv(MF.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MINIPEFT_KERNELS: expected one of auto|triton|torch, got 'cuda'"):
        MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    with pytest.raises(ValueError, match="use_kernels"):
        MF.use_kernels("fast")


def test_forced_triton_refuses_unsupported_operands(kernel_calls):
    x, weight, b, lora_A, lora_B = make_inputs(3, 33, 40, 8, False, torch.float64, torch.float64)
    with MF.use_kernels("triton"), pytest.raises(ValueError, match="share one of"):
        MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)  # auto: the twin takes float64
    assert kernel_calls == []
    x, weight, b, lora_A, lora_B = make_inputs(3, 33, 40, 8, False, F32, F32)
    with MF.use_kernels("triton"), pytest.raises(ValueError, match="rank 0: the kernels need a rank of at least 1"):
        MF.lora_linear(x, weight, b, lora_A[:0], lora_B[:, :0], 2.0)
    assert kernel_calls == []


def test_autocast_takes_the_pytorch_path_and_forced_triton_refuses(kernel_calls):
    """The kernels compute in the operands' dtypes: under autocast auto must take PyTorch, which follows it
    (bfloat16 out of float32 operands), and forced triton must refuse rather than return float32."""
    x, weight, b, lora_A, lora_B = make_inputs(37, 45, 70, 16, True, F32, F32)
    with torch.autocast(DEVICE, dtype=BF16):
        auto = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
        with MF.use_kernels("triton"), pytest.raises(ValueError, match=rf"torch.autocast is on for {DEVICE} "
                                                                       r"\(dtype torch.bfloat16\)"):
            MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert kernel_calls == []
    assert auto.dtype == BF16
    args = [t.double() for t in (x, weight, b, lora_A, lora_B)]
    assert rel_err(auto, reference(*args, 2.0)) <= TOL[BF16]


def test_an_empty_environment_variable_means_auto(kernel_calls, monkeypatch):
    monkeypatch.setenv(MF.ENV_VAR, "")
    assert MF.kernel_mode() == "auto"
    x, weight, b, lora_A, lora_B = make_inputs(3, 33, 40, 8, False, F32, F32)
    MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert len(kernel_calls) == (DEVICE == "cuda")
    monkeypatch.setenv(MF.ENV_VAR, " ")  # anything else but the three modes is still refused
    with pytest.raises(ValueError, match="MINIPEFT_KERNELS: expected one of auto|triton|torch, got ' '"):
        MF.kernel_mode()


def test_public_dropout_draws_one_mask_for_either_path(kernel_calls):
    """Same seed, same mask, same numbers on both paths; eval mode or p = 0 drops nothing."""
    x, weight, b, lora_A, lora_B = make_inputs(37, 45, 70, 16, True, F32, F32)
    outs = {}
    for mode in ("torch", "triton"):
        torch.manual_seed(0)
        with MF.use_kernels(mode):
            outs[mode] = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout=0.3, training=True)
    assert rel_err(outs["triton"], outs["torch"].double()) <= TOL[F32]
    plain = MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert rel_err(outs["torch"], plain.double()) > 0.1
    assert torch.equal(MF.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout=0.3, training=False), plain)


# --- found by QA: double backward, torch.compile with dropout ---------------------------------------------

@pytest.mark.parametrize("in_loop", [True, False], ids=["inloop", "precomputed"])
def test_double_backward_is_refused(in_loop):
    """The backward's dX comes from a kernel, outside autograd, so the backward is not differentiable itself.
    With create_graph=True it once returned gradients that silently missed the dX terms' dependence on the
    adapters (a gradient penalty's dB: 5% off here with U precomputed, all of dX's part missing with U in the
    loop), with no error. Now the second backward is refused by name."""
    x, weight, _, lora_A, lora_B = make_inputs(5, 33, 40, 8, False, F32, F32)
    x, lora_A, lora_B = (t.clone().requires_grad_() for t in (x, lora_A, lora_B))
    y = klora.lora_linear(x, weight, None, lora_A, lora_B, 2.0, xa_in_loop=in_loop)
    dx, da = torch.autograd.grad((y * y).sum(), (x, lora_A), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        (dx.pow(2).sum() + da.pow(2).sum()).backward()


def test_compiled_pytorch_path_with_dropout():
    """torch.compile (Inductor) of the PyTorch path while training with dropout: the mask, uint8 draws viewed
    as bool, made Inductor's CPU code fail to compile (a cast of Vectorized<bool> that does not exist). With
    fallback_random Inductor draws eager's mask, so forward and gradients equal the float64 reference."""
    import torch._inductor.config
    x, weight, b, lora_A, lora_B = make_inputs(3 * 7, 33, 40, 8, True, F32, F32)
    inputs = (x.view(3, 7, 33), weight, b, lora_A, lora_B)
    grad_out = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(0)
    mask, keep = MF.dropout_mask(inputs[0], 0.5, training=True)  # the draws lora_linear makes after the seed
    ref = grads(lambda *t: reference(*t, 2.0, mask, keep), [t.double() for t in inputs], grad_out.double(),
                (0, 2, 3, 4))
    torch._dynamo.reset()
    step = torch.compile(lambda *t: MF.lora_linear(*t, 2.0, dropout=0.5, training=True), fullgraph=True)
    with MF.use_kernels("torch"), torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(0)
        got = grads(step, inputs, grad_out, (0, 2, 3, 4))
    for name, g, want in zip(["y", "dx", "dbias", "dA", "dB"], got, ref):
        assert rel_err(g, want) <= TOL[F32], (name, rel_err(g, want))


def test_the_folder_kernels_shadows_no_package_from_the_repository_root():
    """From the repository root (on sys.path for python -c, a REPL, python -m pytest), `import kernels` found
    the folder kernels/ instead of the PyPI package transformers imports: `from transformers import
    LlamaForCausalLM` failed ("cannot import name 'CUDAProperties' from 'kernels'"). Without that package
    installed, `import kernels` is no module, as anywhere else."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import kernels, transformers, minipeft.kernels as ours\n"
            "from transformers import LlamaForCausalLM\n"
            "assert 'site-packages' in kernels.__file__ and ours.__file__.endswith('kernels/__init__.py'), kernels\n")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True, timeout=300)
    hidden = ("import sys\n"
              "sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
              "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
              "    assert e.name == 'kernels' and 'kernels' not in sys.modules, e\nelse:\n    raise SystemExit(1)\n")
    subprocess.run([sys.executable, "-c", hidden], cwd=root, check=True, capture_output=True, timeout=300)

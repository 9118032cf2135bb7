"""NF4 quantization vs bitsandbytes on CPU: code tables, packed bytes, absmax codes, nested absmax,
offset and dequantized values, bit for bit (the reference is the same arithmetic, so no tolerance)."""
import math

import pytest
import torch

from minipeft.nf4 import (DYNAMIC_CODE, NF4_CODE, NF4Tensor, bits_per_parameter, dequantize_absmax, nf4_nbytes,
                          dequantize_nf4, quantize_nf4)

import bitsandbytes.functional as bnbf

from minipeft import nf4

SHAPES = [(3, 37), (130, 70), (1, 1), (1000,), (64, 64), (5, 3, 43)]


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    # bitsandbytes dequantizes odd last dimensions with a torch.compile'd function: compiling
    # costs seconds per shape, and its eager twin is the same arithmetic.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def assert_same_as_bnb(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> None:
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.data, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert q.offset == state.offset.item()
        assert state.state2.blocksize == 256
    else:
        assert q.nested_absmax is None and q.offset is None and state.state2 is None
    ours, theirs = dequantize_nf4(q), bnbf.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))  # bnb returns (1, 2)-shaped weights transposed


def test_nf4_code_is_bitsandbytes_table():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and NF4_CODE[7] == 0
    assert (NF4_CODE[:7] < 0).all() and (NF4_CODE[8:] > 0).all()  # 7 negative, 8 positive levels


def test_dynamic_map_is_bitsandbytes_table():
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))
    assert DYNAMIC_CODE.numel() == 256 and (DYNAMIC_CODE.diff() >= 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_matches_bitsandbytes(shape, dtype, double_quant):
    torch.manual_seed(math.prod(shape))
    assert_same_as_bnb(torch.randn(shape).to(dtype), 64, double_quant)


@pytest.mark.parametrize("shape", [(130, 70), (17,), (3, 129)], ids=str)
def test_matches_bitsandbytes_blocksize_128_and_fp16(shape):
    torch.manual_seed(1)
    assert_same_as_bnb(torch.randn(shape), blocksize=128)
    assert_same_as_bnb(torch.randn(shape).half(), blocksize=128)


@pytest.mark.parametrize("shape", [(8, 96), (64, 96), (48, 48)], ids=str)
def test_bitsandbytes_cpu_kernel_on_partial_row_blocks(shape):
    """Rows that end inside a 64-block: bitsandbytes 0.50's native CPU dequantize_4bit, which walks the
    (rows, cols) output, mis-scales these (by up to 4x the NF4 error); the bytes and absmax it quantizes
    to are ours, and its kernel over the one-row view, the flat stream of blocks the format defines,
    gives our values. Ours is the format's arithmetic whatever the shape."""
    torch.manual_seed(4)
    w = torch.randn(shape)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w)
    assert torch.equal(q.data, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    state.shape = torch.Size([1, w.numel()])
    assert torch.equal(dequantize_nf4(q).reshape(-1), bnbf.dequantize_4bit(packed, state).reshape(-1))


@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantizing_in_chunks_is_bit_exact(monkeypatch, blocksize):
    """quantize_nf4 takes CHUNK values at a time (bounded temporaries); with chunks of a few blocks,
    odd lengths and a partial last block, the bytes and scales are still bitsandbytes' own."""
    monkeypatch.setattr(nf4, "CHUNK", 192)  # 3 blocks of 64; one of 128 (rounded down to whole blocks)
    torch.manual_seed(7)
    for shape in [(13, 77), (1001,), (6, 256)]:  # rows of whole blocks or odd: see the test above
        assert_same_as_bnb(torch.randn(shape) * torch.logspace(-2, 1, shape[0])[(...,) + (None,) * (len(shape) - 1)],
                           blocksize)


def test_many_blocks_and_scales_match_bitsandbytes():
    # 2 nested blocks of 256, one partial; block scales spread over 4 decades.
    torch.manual_seed(2)
    w = torch.randn(300, 100) * torch.logspace(-3, 1, 300)[:, None]
    assert_same_as_bnb(w)


def test_ties_zero_blocks_and_tiny_blocks_match_bitsandbytes():
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    full = torch.cat([torch.tensor([1.0]), mids, -mids, NF4_CODE, torch.zeros(18)])  # 64: exact midpoints
    zero_block = torch.zeros(64)  # stores absmax 0
    subnormal = torch.full((64,), 1e-40)  # bnb clamps the scale to 1e-38
    partial = torch.cat([torch.tensor([0.5]), mids[:20] / 2])  # the last block divides instead
    w = torch.cat([full, zero_block, subnormal, partial])
    assert_same_as_bnb(w)
    assert_same_as_bnb(w, double_quant=False)
    assert_same_as_bnb(torch.zeros(100))  # an all-zero partial block stores 1e-38


def test_reciprocal_and_division_follow_bitsandbytes():
    # Within a few ulps of a midpoint, x * (1/absmax) (full blocks) and x / absmax (last partial
    # block) can round to opposite sides; bnb uses one in each place, and so must we.
    absmax = torch.tensor(1.588769793510437)
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2 * absmax
    near = [mids]
    for toward in (torch.tensor(9.0), torch.tensor(-9.0)):  # 1 and 2 ulps either side
        x = mids
        for _ in range(2):
            x = torch.nextafter(x, toward)
            near.append(x)
    block = torch.cat([absmax[None], *near])  # 76 values
    assert_same_as_bnb(torch.cat([block, torch.zeros(128 - block.numel()), block]), blocksize=128)


def test_nested_quantizer_snaps_to_bitsandbytes_grid():
    """bnb's CPU 8-bit quantizer rounds x/absmax to a 65536-point grid before the nearest code;
    near 0 the dynamic map is finer than that grid, so exact-nearest codes would differ here."""
    torch.manual_seed(3)
    w = torch.zeros(256 * 64)
    w[::64] = 1 + (torch.rand(256) * 2 - 1) * 1e-4  # block absmaxes 1 +- 1e-4 ...
    w[0], w[64] = 2.0, 0.0  # ... and 2 and 0, so mean ~ 1 and (absmax - mean) / nested_absmax ~ 1e-4
    q = quantize_nf4(w)
    _, state = bnb_quantize(w, 64, True)
    assert torch.equal(q.absmax, state.absmax)
    absmax = w.view(-1, 64).abs().amax(1)
    normed = (absmax - absmax.mean()) / q.nested_absmax
    exact = torch.bucketize(normed, (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2)
    assert (exact != q.absmax.long()).sum() > 10


def test_subnormal_nested_absmax_matches_bitsandbytes():
    """Block absmaxes within ~1e-38 of their mean: the nested absmax is subnormal and its float32
    reciprocal inf, so an absmax equal to the mean scales to 0 * inf = NaN. bitsandbytes' CPU kernel
    stores code 0 for it; this used to raise an IndexError (NaN cast to a grid index)."""
    w = torch.zeros(6, 64)
    w[:, 5] = torch.tensor([1.0, 2, 3, 3, 2, 1]) * 1e-39  # mean 2e-39: two blocks sit on it
    w[:, 9] = -w[:, 5] / 3
    assert_same_as_bnb(w)


def test_double_quant_refuses_an_absmax_mean_that_overflows():
    """Finite weights near float32's limit: the float32 mean of the absmax (the offset) overflows to inf.
    bitsandbytes then dequantizes every weight to NaN, silently; we refuse, naming the way out."""
    w = torch.full((4, 64), 3e38)
    _, state = bnb_quantize(w, 64, True)
    assert state.offset.isinf()  # the reference's own result
    with pytest.raises(ValueError, match="overflows float32.*double_quant=False"):
        quantize_nf4(w)
    assert torch.equal(dequantize_nf4(quantize_nf4(w, double_quant=False)), w)  # absmax alone is finite

def test_nibble_order_and_padding():
    q = quantize_nf4(torch.tensor([-1.0, 1.0, 0.0]), double_quant=False)
    assert q.data.tolist() == [0x0F, 0x77]  # element 0 in the high nibble; pad nibble = code of 0.0
    assert q.absmax.tolist() == [1.0]
    assert dequantize_nf4(q).tolist() == [-1.0, 1.0, 0.0]


def test_dequantized_absmax_is_close_and_values_round_trip():
    torch.manual_seed(4)
    w = torch.randn(128, 96)
    q, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    # 8-bit dynamic codes: error at most half the widest code gap (0.014, near +-1) plus one grid
    # step (2/65535), times the nested absmax; the 1e-6 absorbs float32 rounding.
    bound = q.nested_absmax * (DYNAMIC_CODE.diff().max() / 2 + 2 / 65535) + 1e-6
    assert ((dequantize_absmax(q) - plain.absmax).abs() <= bound).all()
    # NF4 round-off: at most half the widest gap between codes (0.1512 at the top), times absmax.
    err = (dequantize_nf4(plain) - w).abs().view(-1, 64) / plain.absmax[:, None]
    assert err.max() <= (NF4_CODE.diff().max() / 2) + 1e-6


def test_dtype_argument_rounds_the_float32_product():
    torch.manual_seed(5)
    q = quantize_nf4(torch.randn(10, 70).bfloat16())
    full = dequantize_nf4(q, torch.float32)
    assert torch.equal(dequantize_nf4(q), full.bfloat16())
    assert torch.equal(dequantize_nf4(q, torch.float16), full.half())


def test_bits_per_parameter():
    w = torch.randn(1024, 2048)
    q, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    assert plain.nbytes == w.numel() // 2 + 4 * w.numel() // 64
    assert bits_per_parameter(plain) == 4.5  # 4 + 32/64
    assert q.nbytes == w.numel() // 2 + w.numel() // 64 + 4 * w.numel() // (64 * 256) + 4
    assert round(bits_per_parameter(q), 3) == 4.127  # 4 + 8/64 + 32/(64*256)


@pytest.mark.parametrize("tensor, blocksize, message", [
    (torch.randn(8), 48, "blocksize must be one of"),
    (torch.ones(8, dtype=torch.int32), 64, "float32, bfloat16 or float16"),
    (torch.empty(0, 4), 64, "empty tensor"),
    (torch.tensor([1.0, float("nan")]), 64, "NaN or infinite"),
    (torch.empty(4, 4, device="meta"), 64, "meta device"),
])
def test_bad_input_is_refused(tensor, blocksize, message):
    with pytest.raises(ValueError, match=message):
        quantize_nf4(tensor, blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_found_chunk_by_chunk(monkeypatch, bad):
    """Anywhere in a weight of several chunks (a full block or the short last one): refused, and no
    temporary the size of the whole weight is made to find it (isfinite over all of it was)."""
    from minipeft import nf4
    sizes = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: sizes.append(t.numel()) or isfinite(t))
    for where in (0, nf4.CHUNK + 5, 2 * nf4.CHUNK + 40):
        w = torch.randn(2 * nf4.CHUNK + 50)
        w[where] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize_nf4(w)
    assert max(sizes) <= nf4.CHUNK // 64


def test_inconsistent_nf4tensor_is_refused():
    q = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"NF4Tensor.data: expected torch.uint8 with 128 elements"):
        NF4Tensor(q.data[:-1], q.absmax, q.nested_absmax, q.offset, q.shape, 64, torch.float32)
    with pytest.raises(ValueError, match=r"NF4Tensor.nested_absmax: .* found None"):
        NF4Tensor(q.data, q.absmax, None, q.offset, q.shape, 64, torch.float32)
    with pytest.raises(ValueError, match="dtype must be float32"):
        dequantize_nf4(q, torch.int8)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4tensor_stores_its_buffers_contiguous(double_quant):
    # The kernels read the buffers as flat arrays: views given to NF4Tensor are copied contiguous once, at
    # construction, rather than at every kernel call; contiguous buffers are kept as they are, not copied.
    q = quantize_nf4(torch.randn(131, 135), double_quant=double_quant)  # 277 blocks: 2 nested absmax values
    buffers = lambda q: [t for t in (q.data, q.absmax, q.nested_absmax) if t is not None]
    every_other = lambda t: None if t is None else torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    views = [every_other(t) for t in (q.data, q.absmax, q.nested_absmax)]
    assert not any(t.is_contiguous() for t in views if t is not None)
    qs = NF4Tensor(*views, q.offset, q.shape, q.blocksize, q.dtype)
    assert all(t.is_contiguous() for t in buffers(qs))
    assert all(torch.equal(a, b) for a, b in zip(buffers(qs), buffers(q)))
    assert torch.equal(dequantize_nf4(qs), dequantize_nf4(q))
    same = NF4Tensor(q.data, q.absmax, q.nested_absmax, q.offset, q.shape, q.blocksize, q.dtype)
    assert [t.data_ptr() for t in buffers(same)] == [t.data_ptr() for t in buffers(q)]


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 64 * 256, 64 * 256 + 1, 100_003])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_nbytes_predicts_stored_bytes(numel, double_quant):
    q = quantize_nf4(torch.randn(numel), double_quant=double_quant)
    assert nf4_nbytes(numel, double_quant=double_quant) == q.nbytes

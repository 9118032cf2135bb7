"""NF4: 4-bit NormalFloat quantization with double quantization (QLoRA, Dettmers et al. 2023).

Bit-compatible with `bitsandbytes.functional.quantize_4bit(A, blocksize=64, quant_type="nf4",
compress_statistics=True)` on CPU (bitsandbytes 0.50): same packed bytes, absmax codes, nested
absmax, offset and dequantized values (tests/test_nf4.py: chosen cases; tests/test_nf4_fuzz.py: a seeded
fuzz over every blocksize, fp32/bf16/fp16 and edge values). Dequantization follows bitsandbytes' formula,
not its CPU kernel's two AVX-512 bugs (rows ending inside a block mis-scaled, bf16 subnormals flushed to 0).

Quantization of a tensor W with n = W.numel() elements, b = blocksize (64):
    w = W.flatten().float()                                   # row-major, (n,)
    block k = w[k*b : (k+1)*b]  (the last block has n % b elements when b does not divide n)
    absmax[k] = max |block k|                                 # (ceil(n/b),) float32
    code(w_i) = argmin_j |NF4[j] - w_i / absmax[k]|           # 4-bit index into the 16-value table
bfloat16/float16 input is widened to float32 first (exact). Rounding details follow bitsandbytes
(see _absmax_scale): ties go to the lower index, full blocks multiply by the float32 reciprocal
1/absmax while the last partial block divides, and that block's absmax is clamped to >= 1e-38.

Double quantization (the absmax constants cost 32/64 = 0.5 bit per weight; this cuts it to 8/64):
    offset = mean(absmax)                                     # float32 scalar (torch.mean, as bnb)
    c = absmax - offset, in blocks of 256: nested_absmax[m] = max |c block m|   # (ceil(n/b/256),)
    absmax_code[k] = index of the dynamic-map value nearest c[k] / nested_absmax[k // 256], after
                     that ratio is snapped to a 65536-point grid on [-1, 1] as bitsandbytes' CPU
                     kernel does (see _quantize_dynamic; its other backends may pick a neighbouring
                     code in those near-ties)

Stored layout (what a dequantization kernel reads; all tensors contiguous, 1-D):
    data           uint8 (ceil(n/2),): element 2i in the HIGH nibble of byte i, element 2i+1 in the
                   low nibble. When n is odd the last low nibble is 7 (the code of 0.0).
                   bitsandbytes holds the same bytes with shape (ceil(n/2), 1).
    absmax         double quant: uint8 (ceil(n/b),) indices into DYNAMIC_CODE (256 float32 values);
                   otherwise float32 (ceil(n/b),).
    nested_absmax  float32 (ceil(ceil(n/b)/256),); None without double quant.
    offset         Python float holding a float32 value; None without double quant.

Dequantization, every step one float32 operation rounded to nearest (no fused multiply-add:
a kernel that fuses `a*b + c` differs in the last bit; Triton fuses unless told
`enable_fp_fusion=False`):
    s[k] = DYNAMIC_CODE[absmax[k]] * nested_absmax[k // 256]      (rounded)
    s[k] = s[k] + offset                                          (rounded)   # s = absmax when no DQ
    W_i  = NF4_CODE[nibble_i] * s[i // b]                         (rounded), then cast to the output
                   dtype with round-to-nearest-even (bfloat16 / float16) and reshaped to W.shape.

Memory (bits per quantized weight, from the stored buffers, for n large):
    without double quant: 4 + 32/64 = 4.5
    with double quant:    4 + 8/64 + 32/(64*256) = 4.127   (+ 32/n for the offset)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

# bitsandbytes' 4-bit kernels accept these block sizes; the nested (8-bit) block size is fixed.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The outermost quantile: 1 - (1/30 + 1/32)/2, halfway between the symmetric choices for 15 and
# 16 levels, so N(0,1) quantiles stay finite (the paper's "offset").
NF4_OFFSET = 0.9677083
# bitsandbytes' CPU 8-bit quantizer snaps x/absmax to a grid of 65536 points on [-1, 1] first.
GRID_POINTS = 65536
CHUNK = 1 << 20  # values quantize_nf4 quantizes at a time


def create_normal_map(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, sorted, in [-1, 1]: float32 (16,).

    Equal-probability quantiles of N(0, 1): 8 positive values Phi^-1(p) at p = linspace(offset,
    0.5, 9)[:-1], 7 negative values -Phi^-1(p) at p = linspace(offset, 0.5, 8)[:-1], and an exact
    0 (so zero padding and zero weights stay exact). Asymmetric: one more positive level. Divided
    by the largest so that +-1 are codes and absmax maps exactly. As bitsandbytes does, the
    probabilities are float32 and the quantiles float64 before the float32 table is normalized.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def create_dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015, bitsandbytes `create_dynamic_map(signed=True)`).

    The values follow dynamic tree quantization: a sign bit, e zero bits ended by a 1 (scale
    10^-e, e = 0..6), and 6-e bits choosing one of 2^(6-e) linear fractions, the bin centres of
    linspace(0.1, 1, 2^(6-e) + 1). Magnitudes thus run from ~1 (64 steps of 0.014) down to ~1e-7
    (1 step). With 0 and 1: 2 * 127 + 2 = 256 float32 values. The stored 8-bit code is the index
    into this sorted table, not the tree's bit pattern.
    """
    values = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** (6 - e) + 1, dtype=torch.float32)
        magnitudes = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (-e)
        values += [magnitudes, -magnitudes]
    return torch.cat(values).sort().values


NF4_CODE = create_normal_map()
DYNAMIC_CODE = create_dynamic_map()
# The two values each byte decodes to, (256, 2), high nibble first: one lookup per byte reads both,
# where unpacking the nibbles and indexing the 16 values takes four passes (2.7x the time on a CPU).
NF4_PAIRS = torch.stack((NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0x0F]), dim=-1)


@dataclass(eq=False)
class NF4Tensor:
    """A quantized tensor: the buffers of the module docstring plus what is needed to rebuild it."""

    data: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    offset: Optional[float]
    shape: torch.Size
    blocksize: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        n = self.shape.numel()
        blocks = -(-n // self.blocksize)
        expect = {"data": (self.data, torch.uint8, -(-n // 2))}
        if self.offset is None:
            expect["absmax"] = (self.absmax, torch.float32, blocks)
        else:
            expect["absmax"] = (self.absmax, torch.uint8, blocks)
            expect["nested_absmax"] = (self.nested_absmax, torch.float32, -(-blocks // NESTED_BLOCKSIZE))
        for field, (t, dtype, numel) in expect.items():
            if t is None or t.dtype != dtype or t.numel() != numel:
                found = "None" if t is None else f"{t.dtype} with {t.numel()} elements"
                raise ValueError(f"NF4Tensor.{field}: expected {dtype} with {numel} elements for shape "
                                 f"{tuple(self.shape)} and blocksize {self.blocksize}, found {found}")
        # The kernels read each buffer as a flat array: a strided view (of a larger buffer, or loaded so)
        # is copied contiguous here, once, not at each kernel call; a contiguous buffer is kept as it is.
        for field in ("data", "absmax", "nested_absmax"):
            if getattr(self, field) is not None:
                setattr(self, field, getattr(self, field).contiguous())

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored buffers (the offset counts as one float32)."""
        total = self.data.nbytes + self.absmax.nbytes
        if self.offset is not None:
            total += self.nested_absmax.nbytes + 4
        return total


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes quantize_nf4 stores for `numel` weights, without quantizing (for meta-device models):
    ceil(n/2) codes + per block a float32 absmax, or with double quant a uint8 code, plus a
    float32 per 256 blocks and the float32 offset."""
    blocks = -(-numel // blocksize)
    if not double_quant:
        return -(-numel // 2) + 4 * blocks
    return -(-numel // 2) + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


def bits_per_parameter(q: NF4Tensor) -> float:
    """Stored bits per quantized weight: 8 * q.nbytes / n.

    Without double quant: 4 (the code) + 32/64 (a float32 absmax per 64 weights) = 4.5.
    With double quant: 4 + 8/64 (a uint8 absmax code) + 32/(64*256) (a float32 nested absmax per
    256 blocks) = 4.127, plus 32/n for the offset (negligible for a weight matrix).
    """
    return 8 * q.nbytes / q.numel()


def _check_input(tensor: torch.Tensor, blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (as in bitsandbytes), got {blocksize}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4 expects a float32, bfloat16 or float16 tensor, got {tensor.dtype}")
    if tensor.is_meta:
        raise ValueError("quantize_nf4 needs real values; the tensor is on the meta device (load weights first)")
    if tensor.numel() == 0:
        raise ValueError(f"quantize_nf4 cannot quantize an empty tensor (shape {tuple(tensor.shape)})")


def _refuse_non_finite(tensor: torch.Tensor, chunk: torch.Tensor, start: int, name: str) -> None:
    """Raise the ValueError naming the first NaN/inf element of `chunk` (tensor's flat values from
    `start`); only called when the chunk has one, so the bool temporary is the chunk's, once."""
    i = start + int((chunk.isnan() | chunk.isinf()).nonzero()[0])
    index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tensor.shape))
    raise ValueError(f"quantize_nf4: {name} (shape {tuple(tensor.shape)}) contains NaN or infinite values, "
                     f"the first {chunk[i - start].item()} at index {index}; NF4 stores finite weights only")


def _absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, flat / absmax clamped to [-1, 1]) for the 4-bit step, bitsandbytes' way.

    Full blocks multiply by the float32 reciprocal of absmax; the last partial block divides, and
    its stored absmax is clamped to 1e-38 (a full all-zero block stores 0). Both roundings matter
    for values on a midpoint, so they follow bitsandbytes exactly.
    """
    full = flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)]
    if full < flat.numel():
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled.append((flat[full:] / last).clamp(-1, 1))
    return absmax, torch.cat(scaled)


def _nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 value; a value exactly on a midpoint takes the lower index."""
    code = NF4_CODE.to(scaled.device)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)


@functools.lru_cache(maxsize=None)
def _grid_to_dynamic_index() -> torch.Tensor:
    """For each grid point g = -1 + 2i/65535 (float32), the index of the nearest dynamic value.

    Ties go to the lower index (a point equal to a midpoint is not past it).
    """
    i = torch.arange(GRID_POINTS, dtype=torch.float32)
    grid = -1.0 + (2.0 * i) / (GRID_POINTS - 1)
    return torch.searchsorted((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * 0.5, grid).to(torch.uint8)


def _quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of float32 x (1-D) with the dynamic map, blocks of 256.

    As bitsandbytes' CPU kernel: y = clamp(x * (1/absmax), -1, 1) is first snapped to the
    nearest of 65536 grid points, i = floor((y + 1) * 0.5 * 65535 + 0.5), and the code is the
    dynamic value nearest that grid point (so values within ~1.5e-5 of a midpoint, and tiny
    values where the map is finer than the grid, can land one code off the true nearest).
    A block of zeros stores absmax 0 and codes 0. A subnormal absmax (< 2.9e-38) has an infinite
    float32 reciprocal: its nonzero values scale to +-inf (clamped to +-1) and its zeros to
    0 * inf = NaN, which bitsandbytes stores as code 0 (the grid's first point), and so do we.
    Returns (codes uint8, absmax float32).
    """
    blocks = -(-x.numel() // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(x, (0, blocks * NESTED_BLOCKSIZE - x.numel())).view(blocks, -1)
    absmax = padded.abs().amax(dim=1)
    zero = absmax == 0
    y = (padded * (1.0 / absmax.masked_fill(zero, 1.0))[:, None]).clamp(-1, 1).nan_to_num(nan=-1.0)
    grid = ((y + 1.0) * 0.5 * (GRID_POINTS - 1) + 0.5).to(torch.int64)
    codes = _grid_to_dynamic_index().to(x.device)[grid].masked_fill(zero[:, None], 0)
    return codes.reshape(-1)[: x.numel()], absmax


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 name: str = "the tensor") -> NF4Tensor:
    """Quantize `tensor` (any shape, float32/bfloat16/float16) to NF4; see the module docstring.

    Blocks are independent, so they are quantized CHUNK values at a time: the temporaries (float32
    copies, int64 code indices: ~6x the chunk's float32 bytes) stay a few tens of MB whatever the
    weight's size, which matters when a large model is quantized as it loads.

    NaN or +-inf values are refused (a ValueError naming `name` and the first such element):
    bitsandbytes quantizes them without a word, and its block then dequantizes to NaN (an inf to +inf,
    whatever its sign; with double quantization the offset is NaN/inf and so is every weight)."""
    _check_input(tensor, blocksize)
    flat = tensor.detach().reshape(-1)
    step = max(blocksize, CHUNK - CHUNK % blocksize)  # whole blocks, an even number of values
    absmaxes, packed = [], []
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step]
        absmax, scaled = _absmax_scale(chunk.float(), blocksize)
        # A NaN or an infinity makes its block's absmax one: checked here, chunk by chunk, rather than by
        # isfinite over the whole weight, a bool temporary of half a bf16 weight's size.
        if not torch.isfinite(absmax).all():
            _refuse_non_finite(tensor, chunk, start, name)
        codes = _nearest_nf4(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))).to(torch.uint8)
        absmaxes.append(absmax)
        packed.append((codes[0::2] << 4) | codes[1::2])
    absmax, data = torch.cat(absmaxes), torch.cat(packed)
    nested, offset = None, None
    if double_quant:
        offset_t = absmax.mean()
        if not torch.isfinite(offset_t):  # bitsandbytes goes on, and every weight dequantizes to NaN
            raise ValueError(f"quantize_nf4: {name}: double quantization's offset, the float32 mean of the block "
                             "absmax values, overflows float32 (weights near 3.4e38); quantize with double_quant=False")
        absmax, nested = _quantize_dynamic(absmax - offset_t)
        offset = offset_t.item()
    return NF4Tensor(data, absmax, nested, offset, tensor.shape, blocksize, tensor.dtype)


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in float32, for 1-D values (the last block may be short)."""
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, scales.numel() * blocksize - n))
    return (padded.view(-1, blocksize) * scales[:, None]).reshape(-1)[:n]


def dequantize_absmax(q: NF4Tensor) -> torch.Tensor:
    """The float32 absmax per block (ceil(n/blocksize),), undoing double quantization if used."""
    if q.offset is None:
        return q.absmax
    code = DYNAMIC_CODE.to(q.absmax.device)[q.absmax.long()]
    return _scale_blocks(code, q.nested_absmax, NESTED_BLOCKSIZE) + torch.tensor(q.offset, dtype=torch.float32)


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W ~= NF4_CODE[codes] * absmax, shape q.shape, in `dtype` (default: the original dtype)."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, got {dtype}")
    values = torch.index_select(NF4_PAIRS.to(q.data.device), 0, q.data.long()).reshape(-1)[: q.numel()]
    return _scale_blocks(values, dequantize_absmax(q), q.blocksize).to(dtype).view(q.shape)

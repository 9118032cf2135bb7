"""The frozen 4-bit linear layer of QLoRA and whole-model NF4 quantization.

    y = x @ W^T + b,   W = dequantize_nf4(W_nf4) in compute_dtype
    x: (..., in_features) -> y: (..., out_features);  W: (out_features, in_features);  b: (out_features,)

Only the NF4 buffers are kept (packed codes, absmax codes, nested absmax, offset: see
minipeft/nf4.py), about 4.127 bits per weight; W exists only transiently, in the forward and again in
the backward (functional.nf4_linear), never saved between them. Nothing
here is trainable: the weight is buffers and the bias a frozen parameter, so gradients reach x
(and LoRA factors wrapped around this layer) only. Like bitsandbytes' Linear4bit, x is cast to
compute_dtype and the output back to x's dtype.

Tested (tests/test_nf4.py) against F.linear with the dequantized weight, and a quantized
Transformer against the same model whose weights were replaced by their dequantized values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import functional
from .nf4 import FLOAT_DTYPES, NF4Tensor, quantize_nf4

METHODS = ("nf4",)


def _as_bits(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """float32 constants are stored as their int32 bit pattern: `model.to(torch.bfloat16)` casts
    every floating buffer, which would round them and break bit-exact dequantization."""
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _from_bits(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t


def _check_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer; see the module docstring for the formula and shapes.

    Buffers (in the state dict): weight_packed uint8 (ceil(out*in/2),), weight_absmax (uint8
    codes, or float32 without double quant), weight_nested_absmax and weight_offset (float32,
    absent without double quant); float32 ones are held as int32 bit patterns.
    """

    def __init__(self, weight: NF4Tensor, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out_features, in_features) weight, "
                             f"got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"Linear4bit bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.blocksize = weight.blocksize
        # The dtype the Linear's weight had (the model's): to_linear() returns a Linear of it, which may
        # differ from compute_dtype (a float32 model quantized with compute_dtype=bfloat16).
        self.weight_dtype = weight.dtype
        self.compute_dtype = _check_compute_dtype(compute_dtype or weight.dtype)
        self.register_buffer("weight_packed", weight.data)
        self.register_buffer("weight_absmax", _as_bits(weight.absmax))
        self.register_buffer("weight_nested_absmax", _as_bits(weight.nested_absmax))
        offset = None
        if weight.offset is not None:
            offset = torch.tensor(weight.offset, dtype=torch.float32, device=weight.data.device)
        self.register_buffer("weight_offset", _as_bits(offset))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # A Python copy of the offset, so forward never reads a device tensor back to the host.
        self._offset = weight.offset
        self.register_load_state_dict_post_hook(_after_load)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, name: str = "weight") -> "Linear4bit":
        """Quantize `linear.weight` to NF4; compute_dtype defaults to the weight's dtype. `name` is what a
        refusal (a NaN or infinite weight) calls it."""
        weight = quantize_nf4(linear.weight, blocksize=blocksize, double_quant=double_quant, name=name)
        return cls(weight, linear.bias, compute_dtype or linear.weight.dtype)

    @property
    def quantized_weight(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (views of the buffers, no copy)."""
        return NF4Tensor(self.weight_packed, _from_bits(self.weight_absmax), _from_bits(self.weight_nested_absmax),
                         self._offset, torch.Size((self.out_features, self.in_features)), self.blocksize,
                         self.weight_dtype)

    def dequantize(self) -> torch.Tensor:
        """W: (out_features, in_features) in compute_dtype."""
        return functional.dequantize_nf4(self.quantized_weight, self.compute_dtype)  # a bit-exact kernel on CUDA

    def to_linear(self, weight: Optional[torch.Tensor] = None) -> nn.Linear:
        """A frozen nn.Linear in weight_dtype (the model's, which its other layers compute in; compute_dtype
        would give a bfloat16 Linear a float32 model cannot call) with `weight` (out_features, in_features),
        default dequantize(), and this layer's bias: what forward computes, or a merged weight."""
        weight = self.dequantize() if weight is None else weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight_dtype, device=weight.device)
        out.weight.data.copy_(weight)
        if self.bias is not None:
            out.bias.data.copy_(self.bias)
        return out.requires_grad_(False)

    def _apply(self, fn, recurse: bool = True):
        """A floating cast of the model (model.to(torch.bfloat16)) moves compute_dtype and weight_dtype with
        it, as it would a Linear's weight, so that to_linear() (merge_and_unload, dequantize_model) returns a
        layer of the model's dtype; the 4-bit buffers hold integers, which no cast touches."""
        super()._apply(fn, recurse)
        for attr in ("compute_dtype", "weight_dtype"):
            cast = fn(torch.empty(0, dtype=getattr(self, attr))).dtype
            if cast in FLOAT_DTYPES:
                setattr(self, attr, cast)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return functional.nf4_linear(x.to(self.compute_dtype), self.quantized_weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        dq = self.weight_offset is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={dq}, compute_dtype={self.compute_dtype}")


def _after_load(module: Linear4bit, incompatible_keys) -> None:
    """load_state_dict copies into the buffers, but with assign=True it takes the state dict's tensors, which
    may be strided views: those are made contiguous here, once, or every forward would copy them
    (quantized_weight's NF4Tensor). Then the Python copy of the offset is refreshed."""
    for name, buffer in module.named_buffers(recurse=False):
        if not buffer.is_contiguous():
            setattr(module, name, buffer.contiguous())
    offset = _from_bits(module.weight_offset)
    module._offset = None if offset is None else offset.item()


def check_method(method: str) -> str:
    """`method` if minipeft quantizes with it, else a ValueError naming the supported ones."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; supported: {METHODS}")
    return method


def quantization_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    """The (dotted name, nn.Linear) pairs quantize_model replaces: every Linear unless its name, or the
    last part of it, is in `skip`; a Linear shared under several names is listed under each."""
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, nn.Linear) and name not in skip and name.rsplit(".", 1)[-1] not in skip]


def quantize_model(model: nn.Module, method: str = "nf4", compute_dtype: Optional[torch.dtype] = None,
                   skip: tuple[str, ...] = ("lm_head",),
                   weights: Optional[dict[str, NF4Tensor]] = None) -> nn.Module:
    """Replace, in place, every nn.Linear by a Linear4bit (NF4, blocksize 64, double quant).

    A Linear is kept when its dotted name, or the last part of it, is in `skip` (QLoRA keeps the
    output head in 16/32 bit). A Linear shared under several names becomes one shared Linear4bit.
    weights: NF4 weights already quantized, by Linear name (load_pretrained quantizes each as it reads
    it); those Linears' own weights are not read, and may be on the meta device. Returns `model`.
    """
    check_method(method)
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model replaces submodules in place; quantize a bare nn.Linear with "
                         "Linear4bit.from_linear(linear)")
    weights = weights or {}
    replaced: dict[int, Linear4bit] = {}
    for name, linear in quantization_targets(model, skip):
        if id(linear) not in replaced:
            replaced[id(linear)] = (Linear4bit(weights[name], linear.bias, compute_dtype) if name in weights
                                    else Linear4bit.from_linear(linear, compute_dtype=compute_dtype,
                                                                name=f"{name}.weight"))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replaced[id(linear)])
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every Linear4bit by its Linear4bit.to_linear() (a shared one by one shared
    Linear): the inverse of quantize_model up to NF4's rounding. Returns `model`."""
    replaced: dict[int, nn.Linear] = {}
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, Linear4bit)]
    for name, layer in targets:
        if id(layer) not in replaced:
            replaced[id(layer)] = layer.to_linear()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replaced[id(layer)])
    return model


@dataclass
class MemoryFootprint:
    """Stored bytes of a model, measured from its tensors (tied tensors counted once)."""

    quantized_params: int  # weights held in NF4 (in_features * out_features per Linear4bit)
    quantized_bytes: int  # bytes of their NF4 buffers: codes, absmax, nested absmax, offset
    frozen_bytes: int  # NF4 buffers + every parameter with requires_grad=False + other buffers
    trainable_bytes: int  # parameters with requires_grad=True

    @property
    def bits_per_param(self) -> float:
        """8 * quantized_bytes / quantized_params: 4.127 with double quant (nf4.bits_per_parameter)."""
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Bytes of frozen and trainable storage, and bits per NF4-quantized weight, of `model`."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    quantized_bytes = sum(b.nbytes for m in layers for b in m.buffers(recurse=False))
    params = list(model.parameters())
    trainable = sum(p.nbytes for p in params if p.requires_grad)
    frozen = sum(p.nbytes for p in params if not p.requires_grad) + sum(b.nbytes for b in model.buffers())
    return MemoryFootprint(sum(m.in_features * m.out_features for m in layers), quantized_bytes, frozen, trainable)

"""RoPE frequency scaling: how a checkpoint trained with a longer context than its pretraining
stretches its rotary frequencies (config.json's `rope_scaling`, `rope_parameters` in transformers 5).

Plain RoPE rotates pair i of a head (i < d/2, d = head_dim) at position p by the angle p · f_i,

    f_i = theta^(-2i/d)                                       (its wavelength: λ_i = 2π / f_i)

"linear" (position interpolation, Chen et al. 2023) divides every frequency by `factor`: position p
turns as far as p / factor did, so factor × the trained context fits in the angles seen in training.

"llama3" (Llama 3.1 and later) keeps the high frequencies, which encode local order and never
completed a turn less often than the context allowed, and interpolates only the low ones, with
L = original_max_position_embeddings (the pretraining context; as in transformers, where config.json
leaves it out, its top-level original_max_position_embeddings, else max_position_embeddings):

    λ_i < L / high_freq_factor      f_i                                   (short wavelengths: unchanged)
    λ_i > L / low_freq_factor       f_i / factor                          (long wavelengths: interpolated)
    otherwise                       (1 - s) f_i / factor + s f_i,  s = (L / λ_i - low_freq_factor)
                                                                        / (high_freq_factor - low_freq_factor)

s runs from 0 to 1 across the middle band, so the two regimes join continuously. Other types (yarn,
dynamic NTK, longrope) rescale attention or depend on the sequence length; they are refused.
tests/test_model_parity.py checks the logits against transformers for both types.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

# rope type -> the keys it needs (besides "rope_type")
SCALING_KEYS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_IGNORED = {"rope_theta", "type"}  # rope_theta has its own field; "type" is rope_type's old name


def check_rope_scaling(scaling: Optional[dict[str, Any]],
                       max_position_embeddings: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The scaling dict in its canonical form ({"rope_type", *its keys}), None for plain RoPE; a
    ValueError naming the type or key that is not supported, missing, or out of range.
    "llama3" without original_max_position_embeddings takes max_position_embeddings, the model's
    context, where given (transformers' standardize_rope_params does the same)."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in SCALING_KEYS:
        raise ValueError(f"rope scaling type {kind!r} is not supported; expected one of {sorted(SCALING_KEYS)} "
                         f"(or plain RoPE), got {scaling!r}")
    needed = SCALING_KEYS[kind]
    fallback = {"original_max_position_embeddings": max_position_embeddings} \
        if kind == "llama3" and max_position_embeddings is not None else {}
    missing = [k for k in needed if k not in scaling and k not in fallback]
    if missing:
        raise ValueError(f"rope scaling {kind!r}: missing {missing}, got {scaling!r}")
    other = set(scaling) - set(needed) - _IGNORED - {"rope_type"}
    if scaling.get("partial_rotary_factor", 1.0) == 1.0:  # a full rotary dimension: the default
        other.discard("partial_rotary_factor")
    if other:
        raise ValueError(f"rope scaling {kind!r}: unsupported key(s) {sorted(other)}, got {scaling!r}")
    if not scaling["factor"] >= 1:
        raise ValueError(f"rope scaling {kind!r}: factor must be >= 1, got {scaling['factor']}")
    if kind == "llama3" and not 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ValueError(f"rope scaling 'llama3': needs 0 < low_freq_factor < high_freq_factor, got {scaling!r}")
    return {"rope_type": kind, **{k: scaling.get(k, fallback.get(k)) for k in needed}}


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict[str, Any]] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """f_i for i < head_dim/2 (module docstring), float32; scaling as check_rope_scaling returns it."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    context, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                               "high_freq_factor"))
    wavelength = 2 * math.pi / inv_freq
    s = (context / wavelength - low) / (high - low)
    middle = (1 - s) * inv_freq / factor + s * inv_freq
    return torch.where(wavelength < context / high, inv_freq,
                       torch.where(wavelength > context / low, inv_freq / factor, middle))

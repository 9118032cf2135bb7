"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

A small residual MLP after a frozen sublayer's output y (B, T, d), bottleneck width m << d:

    y = base(x)                                   # o_proj or down_proj, frozen
    y' = y + up(act(down(y)))                     # down: Linear(d, m), up: Linear(m, d), both with bias
                                                  # up starts at zero: the model starts as an exact no-op

Placement (which sublayer outputs get one, per decoder layer):
    "houlsby":  after attention (wrap self_attn.o_proj) and after the MLP (wrap mlp.down_proj)
    "pfeiffer": after the MLP only (wrap mlp.down_proj)
The decoder adds y' to its residual stream, so the adapter sits inside the sublayer, as in both papers.

Trainable parameters per wrapped layer: d·m + m (down) + m·d + d (up) = 2·d·m + m + d.
LLaMA-2-7B (d = 4096, 32 layers) at m = 384: Houlsby 201,613,312 (2.91% of all parameters, about
the 3.6% per task Houlsby et al. report on BERT), Pfeiffer 100,806,656 (1.47%).
The nonlinearity makes the adapter impossible to fold into the frozen weight, so merging raises.
Hugging Face PEFT has no bottleneck adapter: the files use peft_type "BOTTLENECK_ADAPTER" (ours)
in PEFT's layout (`adapter_config.json`, keys `base_model.model.<path>.adapter_down.weight`);
PEFT itself cannot load them. Tested in tests/test_adapter.py (no-op at init, only adapters
train, a hand-written eager reference, save/load, parameter-count formula on llama-2-7b).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .peft_config import PeftConfig
from .tuner_layer import TunerLayer

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
}
PLACEMENTS = {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]}


@dataclasses.dataclass
class AdapterConfig(PeftConfig):
    bottleneck_size: Optional[int] = None  # m; give exactly one of bottleneck_size and reduction_factor
    reduction_factor: Optional[int] = None  # m = d // reduction_factor (d: the wrapped layer's output width)
    placement: str = "houlsby"  # "houlsby": after attention and MLP; "pfeiffer": after the MLP only
    activation: str = "relu"  # a key of ACTIVATIONS
    target_modules: Optional[Union[list[str], str]] = None  # None: derived from placement
    peft_type = "BOTTLENECK_ADAPTER"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.bottleneck_size is None) == (self.reduction_factor is None):
            raise ValueError("AdapterConfig: give exactly one of bottleneck_size and reduction_factor, got "
                             f"bottleneck_size={self.bottleneck_size}, reduction_factor={self.reduction_factor}")
        for field in ("bottleneck_size", "reduction_factor"):
            if getattr(self, field) is not None:
                self._check_positive_int(field)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig: placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.target_modules is None:
            self.target_modules = list(PLACEMENTS[self.placement])

    def bottleneck_for(self, d: int) -> int:
        """m for a layer of output width d."""
        m = self.bottleneck_size or d // self.reduction_factor
        if m <= 0:
            raise ValueError(f"AdapterConfig: reduction_factor={self.reduction_factor} leaves no bottleneck "
                             f"for a layer of width {d}")
        return m


class BottleneckAdapter(TunerLayer):
    """A Linear (or 4-bit Linear) base layer followed by named bottleneck adapters."""

    adapter_module_names = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.activation: dict[str, str] = {}

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        # float32 whatever the base dtype, as LoRA: small updates would round away in bf16.
        device = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())).device
        d, m = self.out_features, config.bottleneck_for(self.out_features)
        self.adapter_down[name] = nn.Linear(d, m, dtype=torch.float32, device=device)  # nn.Linear's init
        self.adapter_up[name] = nn.Linear(m, d, dtype=torch.float32, device=device)
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)
        self.activation[name] = config.activation

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.activation[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or name is None:
            return y
        h = ACTIVATIONS[self.activation[name]](self.adapter_down[name](y.float()))
        return y + self.adapter_up[name](h).to(y.dtype)

    def unloaded(self) -> nn.Module:
        """Merging is impossible (act is not linear): merge_and_unload raises; unload() drops the adapters."""
        self.merge()
        return self.base_layer

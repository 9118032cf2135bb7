"""What every layer-wrapping method shares: a frozen `base_layer` plus named adapters.

A wrapper keeps each adapter's modules in `nn.ModuleDict`s (or its bare tensors in `nn.ParameterDict`s)
keyed by adapter name (the names in `adapter_module_names`), so several adapters live on one model and
a server can switch between them per request. Exactly one adapter is active; `disabled` bypasses all
of them. Adapter parameters are found structurally (walk the wrappers), never by matching a substring
like "lora_". `layer_for` says which modules a method can wrap, and with which wrapper class.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Optional

import torch
from torch import nn

from .targets import is_linear


class TunerLayer(nn.Module):
    adapter_module_names: ClassVar[tuple[str, ...]] = ()
    wraps: ClassVar[str] = "Linear"  # the kinds of module layer_for accepts, for targets.find_targets' error

    @classmethod
    def layer_for(cls, module: nn.Module) -> Optional[type["TunerLayer"]]:
        """The wrapper class this method puts around `module`, None if it cannot wrap it."""
        return cls if is_linear(module) else None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.merged_adapters: list[str] = []

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_module_names[0]).keys())

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter; only its parameters are trainable afterwards."""
        if self.merged_adapters and self.merged_adapters != [name]:
            raise ValueError(f"adapter {self.merged_adapters} is merged; unmerge it before switching to {name!r}")
        for attr in self.adapter_module_names:
            for key, module in getattr(self, attr).items():
                module.requires_grad_(key == name)
        self.active_adapter = name if name in self.adapter_names() else None  # targets may differ per adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for attr in self.adapter_module_names:
            del getattr(self, attr)[name]
        if self.active_adapter == name:
            remaining = self.adapter_names()
            self.active_adapter = remaining[0] if remaining else None

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """This layer's tensors of adapter `name`, keyed as in PEFT files: `lora_A.weight` for a module,
        the bare attribute for a parameter held in an nn.ParameterDict (`lora_embedding_A`)."""
        out = {}
        for attr in self.adapter_module_names:
            entry = getattr(self, attr)[name]
            if isinstance(entry, nn.Parameter):
                out[attr] = entry.detach()  # a view of the parameter, as state_dict() gives
            else:
                out.update({f"{attr}.{key}": value for key, value in entry.state_dict().items()})
        return out

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for attr in self.adapter_module_names:
            module = getattr(self, attr)[name]
            if isinstance(module, nn.Parameter):
                with torch.no_grad():
                    module.copy_(tensors[attr])
                continue
            sub = {k[len(attr) + 1:]: v for k, v in tensors.items() if k.startswith(attr + ".")}
            module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in sub.items()})

    def merge(self, name: Optional[str] = None) -> None:
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weight: "
                         "its adapter is not a linear function of the input")

    def unmerge(self) -> None:
        """Undo merges; a layer that cannot merge has nothing merged, so nothing to undo."""

    def unloaded(self) -> nn.Module:
        """The plain module that replaces this wrapper when adapters are removed (merged or not)."""
        return self.base_layer


class ModulesToSave(TunerLayer):
    """A whole module trained and saved per adapter (PEFT's `modules_to_save`, e.g. `lm_head`).

    The original stays frozen; each adapter owns a trainable copy, saved under the module's own
    name (`lm_head.weight`), as PEFT saves it.
    """

    adapter_module_names = ("modules_to_save",)
    wraps = "any"

    @classmethod
    def layer_for(cls, module: nn.Module) -> Optional[type[TunerLayer]]:
        return cls  # a copy of any module trains whole

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config: object) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer).requires_grad_(True)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict())

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(name, {f"modules_to_save.{k}": v for k, v in tensors.items()})

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter is None:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def unloaded(self) -> nn.Module:
        return self.modules_to_save[self.active_adapter] if self.active_adapter else self.base_layer

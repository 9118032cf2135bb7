"""Which modules a layer-wrapping method (LoRA, bottleneck adapters) targets, by PEFT's rules.

- a list of names: a module matches when its full name equals an entry or ends with "." + entry
  (so ["q_proj", "v_proj"] picks every layer's q and v projections);
- a string: a regular expression that must match the full module name (`re.fullmatch`);
- "all-linear": every Linear (4-bit ones too) except the output layer `lm_head`.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from torch import nn

# PEFT's default targets for these architectures (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = ("q_proj", "v_proj")


def is_linear(module: nn.Module) -> bool:
    from .linear4bit import Linear4bit

    return isinstance(module, (nn.Linear, Linear4bit))


def find_targets(model: nn.Module, target_modules: Optional[Union[str, Sequence[str]]]) -> list[str]:
    """Full names of the Linear modules selected by `target_modules` (see the module docstring)."""
    from .tuner_layer import TunerLayer

    # A module already wrapped (a second adapter) counts by its wrapper's name; its insides don't.
    wrappers = [n for n, m in model.named_modules() if isinstance(m, TunerLayer)]
    names = [n for n, _ in model.named_modules() if n and not any(n.startswith(w + ".") for w in wrappers)]
    linears = [n for n in names if is_linear(getattr(model.get_submodule(n), "base_layer", model.get_submodule(n)))]
    if target_modules is None:
        target_modules = list(DEFAULT_TARGETS)
    if target_modules == "all-linear":
        found = [n for n in linears if n.split(".")[-1] != "lm_head"]
    elif isinstance(target_modules, str):
        found = [n for n in names if re.fullmatch(target_modules, n)]
    else:
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not found:
        leaf_names = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(f"target_modules={target_modules!r} matched no module; the model's Linear modules are "
                         f"named {leaf_names} (e.g. {linears[:2]})")
    not_linear = [n for n in found if n not in set(linears)]
    if not_linear:
        raise ValueError(f"target_modules={target_modules!r} matched modules that are not Linear layers: {not_linear}")
    return found


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)

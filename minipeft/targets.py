"""Which modules a layer-wrapping method (LoRA, bottleneck adapters) targets, by PEFT's rules.

- a list of names: a module matches when its full name equals an entry or ends with "." + entry
  (so ["q_proj", "v_proj"] picks every layer's q and v projections);
- a string: a regular expression that must match the full module name (`re.fullmatch`);
- "all-linear": every Linear (4-bit ones too) except the output layer `lm_head` (never an embedding,
  as in PEFT: name "embed_tokens" to adapt it).
Each method says which modules it can wrap (`TunerLayer.layer_for`: LoRA takes Linear and Embedding);
a name matching another kind of module is refused.

LoRA's `layers_to_transform` (an index or a list of them; None or []: every layer) keeps, of the
modules a list of names selects by suffix, those inside the given layers, as PEFT: a module's layer
is the first `<container>.<i>.` in its name, with `<container>` one of `layers_pattern` (regexes;
None: any name after at least one parent, so "model.layers.3.mlp" is in layer 3, lm_head in none).
As in PEFT, a list entry equal to a full module name is taken whatever its layer.

LoRA's `exclude_modules` then removes modules from that selection, with target_modules' two forms:
a string is a regex for the full name (`re.fullmatch`), a list names modules by full name or suffix.
Excluding every selected module is an error, and an exclusion that removes nothing warns (PEFT's both).
Modules in `modules_to_save` (a whole trained copy) are never targets either, nor anything inside them,
as in PEFT: a module cannot be both.
"""
from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Optional, Sequence, Union

from torch import nn

if TYPE_CHECKING:
    from .tuner_layer import TunerLayer

# PEFT's default targets for these architectures (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = ("q_proj", "v_proj")


def is_linear(module: nn.Module) -> bool:
    from .linear4bit import Linear4bit

    return isinstance(module, (nn.Linear, Linear4bit))


def layer_index(name: str, layers_pattern: Optional[Union[str, Sequence[str]]] = None) -> Optional[int]:
    """The index of the layer module `name` sits in (module docstring), None outside any layer."""
    if not layers_pattern:
        regexes = [r".*?\.[^.]*\.(?P<idx>\d+)\."]  # lazy: the first index, not an expert's inside it
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]
    for regex in regexes:
        match = re.match(regex, name)
        if match:
            return int(match["idx"])
    return None


def find_targets(model: nn.Module, target_modules: Optional[Union[str, Sequence[str]]],
                 wrapper: Optional[type["TunerLayer"]] = None,
                 layers_to_transform: Optional[Union[int, Sequence[int]]] = None,
                 layers_pattern: Optional[Union[str, Sequence[str]]] = None,
                 exclude_modules: Optional[Union[str, Sequence[str]]] = None,
                 modules_to_save: Sequence[str] = ()) -> list[str]:
    """Full names of the modules selected by `target_modules` in the layers `layers_to_transform`, less
    `exclude_modules` and `modules_to_save` (see the module docstring), each one that `wrapper` (a
    TunerLayer class; default: Linear only) can wrap."""
    from .tuner_layer import TunerLayer

    wrapper = wrapper or TunerLayer

    def unwrapped(name: str) -> nn.Module:
        module = model.get_submodule(name)
        return getattr(module, "base_layer", module)

    # A module already wrapped (a second adapter) counts by its wrapper's name; its insides don't.
    wrappers = [n for n, m in model.named_modules() if isinstance(m, TunerLayer)]
    names = [n for n, _ in model.named_modules() if n and not any(n.startswith(w + ".") for w in wrappers)]
    linears = [n for n in names if is_linear(unwrapped(n))]
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform

    def in_layers(name: str) -> bool:
        return not wanted or layer_index(name, layers_pattern) in wanted

    if target_modules is None:
        target_modules = list(DEFAULT_TARGETS)
    if target_modules == "all-linear":
        found = [n for n in linears if n.split(".")[-1] != "lm_head"]
    elif isinstance(target_modules, str):
        found = [n for n in names if re.fullmatch(target_modules, n)]
    else:
        found = [n for n in names if n in target_modules
                 or (any(n.endswith("." + t) for t in target_modules) and in_layers(n))]
    saved = [n for n in found if any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in modules_to_save or ())]
    kept = [n for n in found if not (exclude_modules and _named(n, exclude_modules)) and n not in saved]
    if found and not kept:
        raise ValueError(f"exclude_modules={exclude_modules!r} and modules_to_save={modules_to_save!r} exclude "
                         f"every module target_modules={target_modules!r} selects ({found[:2]}...)")
    if exclude_modules and len(kept) + len(saved) == len(found):
        warnings.warn(f"You have passed exclude_modules={exclude_modules} but no modules were excluded. "
                      "Please check that exclude_modules was set correctly.")  # PEFT's words
    found = kept
    if not found:
        leaf_names = sorted({n.split(".")[-1] for n in linears})
        layers = "" if layers_to_transform is None else f" with layers_to_transform={layers_to_transform!r}"
        raise ValueError(f"target_modules={target_modules!r}{layers} matched no module; the model's Linear modules "
                         f"are named {leaf_names} (e.g. {linears[:2]})")
    refused = [n for n in found if wrapper.layer_for(unwrapped(n)) is None]
    if refused:
        raise ValueError(f"target_modules={target_modules!r} matched modules that are not {wrapper.wraps} layers: "
                         f"{refused}")
    return found


def _named(name: str, modules: Union[str, Sequence[str]]) -> bool:
    """Whether module `name` is one of `modules`: a regex for the full name, or names and suffixes."""
    if isinstance(modules, str):
        return re.fullmatch(modules, name) is not None
    return name in modules or any(name.endswith("." + m) for m in modules)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)

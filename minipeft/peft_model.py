"""`get_peft_model` and `PeftModel`: freeze a model, attach named adapters, switch, delete, disable, run.

A PeftModel holds the base Transformer (wrapped in place) and, per adapter name, its config.
Layer methods (LoRA, bottleneck adapters) wrap the targeted modules; prompt-learning methods
(prefix, prompt tuning) keep a module in `prompt_encoder[name]` that runs the base model with
their virtual tokens. Merging is in peft_merge.py, the adapter folders (PEFT's file format) in
peft_files.py, parameter counts in trainable.py; their names are importable from here too.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from .adapter import BottleneckAdapter
from .lora import LoraLayer, LoraLinear
from .model import Transformer
from .peft_config import PeftConfig
from .peft_files import BASE_QUANTIZATION, PREFIX, WEIGHTS_NAME, AdapterFilesMixin
from .peft_merge import MergeMixin
from .prompt_learning import PrefixEncoder, PromptEmbedding
from .targets import find_targets, set_submodule
from .trainable import count_parameters, format_trainable, full_finetune, trainability_restored_on_error
from .tuner_layer import ModulesToSave, TunerLayer

__all__ = ["PeftModel", "get_peft_model", "full_finetune", "count_parameters", "format_trainable",
           "WEIGHTS_NAME", "PREFIX", "BASE_QUANTIZATION", "LAYER_TUNERS", "PROMPT_ENCODERS"]

# peft_type -> the layer wrapper (layer methods) or the prompt encoder (prompt-learning methods).
# LoraLayer.layer_for picks LoraLinear or LoraEmbedding per module.
LAYER_TUNERS: dict[str, type[TunerLayer]] = {"LORA": LoraLayer, "BOTTLENECK_ADAPTER": BottleneckAdapter}
PROMPT_ENCODERS: dict[str, type[nn.Module]] = {"PREFIX_TUNING": PrefixEncoder, "PROMPT_TUNING": PromptEmbedding}


def get_peft_model(model: Transformer, config: PeftConfig, adapter_name: str = "default") -> "PeftModel":
    """Freeze `model`, attach adapter `adapter_name` described by `config`, and make it active."""
    return PeftModel(model, config, adapter_name)


def _check_bare(model: nn.Module) -> None:
    """Refuse a model that already holds adapters. PEFT warns ("modify a model with PEFT for a second time")
    and goes on: the new adapter replaces the old one's layers of the same name where both target a module
    and leaves the old one's elsewhere, a mix that neither config describes (and the first PeftModel runs it)."""
    if isinstance(model, PeftModel):
        raise ValueError("model is a PeftModel already: add_adapter() or load_adapter() on it, or pass its "
                         "get_base_model() after unload() / merge_and_unload()")
    adapted = [n for n, m in model.named_modules() if isinstance(m, TunerLayer)]
    if adapted:
        raise ValueError(f"model already holds adapters ({adapted[0]}, ... {len(adapted)} wrapped modules) from an "
                         "earlier get_peft_model / from_pretrained: add_adapter() on that PeftModel, or pass its "
                         "unload() (the bare base) or merge_and_unload()")


class PeftModel(MergeMixin, AdapterFilesMixin, nn.Module):
    def __init__(self, model: Transformer, config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        self._frozen: set[str] = set()  # adapters loaded with is_trainable=False
        _check_bare(model)
        with trainability_restored_on_error(model):  # add_adapter undoes its own wrapping
            self.base_model = model.requires_grad_(False)
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)
        self.train(model.training)  # new dropout modules follow the model's mode

    @property
    def config(self):
        return self.base_model.config

    def tuner_layers(self) -> Iterator[tuple[str, TunerLayer]]:
        return ((n, m) for n, m in self.base_model.named_modules() if isinstance(m, TunerLayer))

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: PeftConfig) -> None:
        """Attach a new adapter (not made active: call set_adapter). A refusal met on the way (a
        module another method wraps, an init a layer cannot take) undoes what was attached. As PEFT,
        a model with a merged adapter is then unmerged, with a warning (the active adapter runs unmerged)."""
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists")
        if not isinstance(config, PeftConfig):  # a dict, a class, or peft's own config object
            got = f"the class {config.__name__}" if isinstance(config, type) else type(config).__module__ + "." + \
                type(config).__qualname__
            raise TypeError(f"config must be a minipeft config instance (LoraConfig(...), PrefixTuningConfig(...), "
                            f"...), got {got}; from a dict with 'peft_type': PeftConfig.from_dict(d)")
        self._check_bias(config)
        config.check_model(self.base_model)
        try:
            if config.is_prompt_learning:
                self.prompt_encoder[name] = PROMPT_ENCODERS[config.peft_type](config, self.base_model)
            else:
                layer_cls = LAYER_TUNERS[config.peft_type]
                layers = (getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None),
                          getattr(config, "exclude_modules", None), getattr(config, "modules_to_save", None))
                for target in find_targets(self.base_model, config.target_modules, layer_cls, *layers):
                    self._wrap(target, layer_cls).add_adapter(name, config.for_module(target))
            for target in getattr(config, "modules_to_save", None) or []:
                found = [n for n, _ in self.base_model.named_modules() if n == target or n.endswith("." + target)]
                if not found:  # PEFT is silent: nothing trains, and the name is likely a typo
                    warnings.warn(f"modules_to_save entry {target!r} names no module of the model; nothing is "
                                  "saved for it")
                for full in found:
                    self._wrap(full, ModulesToSave).add_adapter(name, config)
        except BaseException:
            self._remove_modules(name)
            raise
        self.peft_config[name] = config
        if config.inference_mode:  # as PEFT: built frozen
            self._frozen.add(name)
        self._unmerge_with_warning()  # as PEFT, whose add_adapter re-sets the active adapter
        for _, layer in self.tuner_layers():  # new wrappers start inactive; keep the model's choice
            layer.set_adapter(self.active_adapter)
        self._set_trainable(self.active_adapter)

    def _check_bias(self, config: PeftConfig) -> None:
        """As PEFT: at most one adapter trains biases. They are the base's own tensors, shared by every
        adapter, so a second one would change the first one's output (and the base's)."""
        if getattr(config, "bias", "none") == "none":
            return
        for other, cfg in self.peft_config.items():
            if getattr(cfg, "bias", "none") != "none":
                raise ValueError(f"adapter {other!r} already trains biases (bias={cfg.bias!r}); only 1 adapter "
                                 "with bias is supported: give the others bias='none'")

    def _wrap(self, target: str, layer_cls: type[TunerLayer]) -> TunerLayer:
        module = self.base_model.get_submodule(target)
        if isinstance(module, layer_cls):
            return module
        if isinstance(module, TunerLayer):
            raise ValueError(f"{target} is already wrapped by {type(module).__name__}; "
                             f"methods of different kinds cannot share a module")
        # A modules_to_save copy of a module holding a LoRA layer would copy the wrapper, its adapters and all
        # (PEFT adapts no module inside a modules_to_save one).
        inside = [f"{target}.{n}" for n, m in module.named_modules() if isinstance(m, TunerLayer)]
        if inside:
            raise ValueError(f"{target} contains adapted modules {inside}; a module in modules_to_save "
                             "cannot hold a target_modules one")
        wrapper = layer_cls.layer_for(module)(module)
        set_submodule(self.base_model, target, wrapper)
        return wrapper

    def _check_known(self, name: str) -> None:
        """A ValueError unless `name` is one of this model's adapters (a TypeError unless it is a str:
        one adapter is active at a time, and a list would fail later as unhashable)."""
        if not isinstance(name, str):
            raise TypeError(f"adapter name must be a str, got {name!r}; adapters: {sorted(self.peft_config)}")
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter. As PEFT, a merged adapter (even `name`) is unmerged first,
        with a warning, before any layer switches: `name` then runs unmerged."""
        self._check_known(name)
        self._unmerge_with_warning()
        for _, layer in self.tuner_layers():
            layer.set_adapter(name)
        self.active_adapter = name
        self._set_trainable(name)

    def _set_trainable(self, name: str) -> None:
        """Only the active adapter's parameters train (and biases, if its LoRA config says so),
        unless it was loaded for inference (`is_trainable=False`)."""
        train = name not in self._frozen
        for key, enc in self.prompt_encoder.items():
            enc.requires_grad_(train and key == name)
        for _, layer in self.tuner_layers():
            for attr in layer.adapter_module_names:
                for key, module in getattr(layer, attr).items():
                    module.requires_grad_(train and key == name)
        for p in self._bias_parameters(name).values():
            p.requires_grad_(train)

    def _bias_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The biases adapter `name` trains, by name. As in PEFT, none inside a modules_to_save wrapper:
        the copy trains whole already, and the frozen original it stands in for stays frozen."""
        bias = getattr(self.peft_config.get(name), "bias", "none")
        in_copies = tuple(n + "." for n, m in self.tuner_layers() if isinstance(m, ModulesToSave))
        # every adapter's own modules (LoRA's, a bottleneck adapter's beside it): theirs, not the base's
        adapters = tuple(f"{n}.{attr}." for n, m in self.tuner_layers() for attr in m.adapter_module_names)
        params = {n: p for n, p in self.base_model.named_parameters()
                  if n.endswith("bias") and not n.startswith(in_copies + adapters)}
        if bias == "all":
            return params
        if bias == "lora_only":  # the modules this adapter wraps, not those only another adapter wraps
            wrapped = {n + ".base_layer.bias" for n, m in self.tuner_layers()
                       if isinstance(m, LoraLinear) and name in m.adapter_names()}
            return {n: p for n, p in params.items() if n in wrapped}
        return {}

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`; deleting the active one activates the first remaining name (sorted).
        Deleting the last one leaves a model with no adapter: add_adapter + set_adapter before running it."""
        self._check_known(name)
        if name in self._merged():  # refused before any layer changes
            raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() before deleting it")
        self._remove_modules(name)
        del self.peft_config[name]
        self._frozen.discard(name)  # the name may be reused by a new, trainable adapter
        if self.active_adapter == name and self.peft_config:
            self.set_adapter(min(self.peft_config))  # as PEFT's layers: the first remaining name, sorted

    def _remove_modules(self, name: str) -> None:
        """Adapter `name`'s modules out of every layer (a wrapper left with none is unwrapped) and
        its prompt encoder."""
        for path, layer in list(self.tuner_layers()):
            if name in layer.adapter_names():
                layer.delete_adapter(name)
            if not layer.adapter_names():
                set_submodule(self.base_model, path, layer.base_layer)
        if name in self.prompt_encoder:
            del self.prompt_encoder[name]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (a merged adapter is unmerged meanwhile)."""
        merged = [(layer, list(layer.merged_adapters)) for _, layer in self.tuner_layers() if layer.merged_adapters]
        for layer, _ in merged:
            layer.unmerge()
        # Each layer gets its own state back: nested in another disable_adapter block, it stays disabled.
        layers = [(layer, layer.disabled) for _, layer in self.tuner_layers()]
        was_disabled, self._disabled = self._disabled, True
        for layer, _ in layers:
            layer.disabled = True
        try:
            yield
        finally:
            self._disabled = was_disabled
            for layer, disabled in layers:
                layer.disabled = disabled
            for layer, names in merged:
                for n in names:
                    layer.merge(n)

    # --- running --------------------------------------------------------------------------------
    @property
    def active_peft_config(self) -> PeftConfig:
        if self.active_adapter not in self.peft_config:  # PEFT: KeyError
            raise ValueError(f"no adapter named {self.active_adapter!r}: it was deleted, and with it the last "
                             "adapter; add_adapter() and set_adapter() one first")
        return self.peft_config[self.active_adapter]

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """Logits (B, T, vocab) of the base model with the active adapter."""
        if self.active_peft_config.is_prompt_learning and not self._disabled:
            encoder = self.prompt_encoder[self.active_adapter]
            return encoder(self.base_model, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.base_model(input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        print(format_trainable(*self.get_nb_trainable_parameters()))

    def get_base_model(self) -> Transformer:
        return self.base_model

    def get_output_embeddings(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

"""`get_peft_model` and `PeftModel`: freeze a model, attach named adapters, count, save, load, merge.

A PeftModel holds the base Transformer (wrapped in place) and, per adapter name, its config.
Layer methods (LoRA, bottleneck adapters) wrap the targeted modules; prompt-learning methods
(prefix, prompt tuning) keep a module in `prompt_encoder[name]` that runs the base model with
their virtual tokens. Files follow Hugging Face PEFT: `adapter_config.json` +
`adapter_model.safetensors`, tensor keys `base_model.model.<module path>.lora_A.weight` (the
adapter name removed), extra adapters in sub-directories named after them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .adapter import BottleneckAdapter
from .checkpoint import check_state_dict, load_safetensors, open_safetensors
from .linear4bit import Linear4bit, dequantize_model
from .lora import LoraConfig, LoraLayer, LoraLinear
from .model import Transformer
from .files import staged_dir
from .peft_config import CONFIG_NAME, PeftConfig
from .prompt_learning import PrefixEncoder, PromptEmbedding
from .targets import find_targets, set_submodule
from .tuner_layer import ModulesToSave, TunerLayer

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The weights file's metadata records an NF4 base (QLoRA): the adapter was fitted to the rounded
# weights, so inference and merging must load the base the same way (saved_base_quantization).
BASE_QUANTIZATION = "minipeft.base_quantization"
# peft_type -> the layer wrapper (layer methods) or the prompt encoder (prompt-learning methods).
# LoraLayer.layer_for picks LoraLinear or LoraEmbedding per module.
LAYER_TUNERS: dict[str, type[TunerLayer]] = {"LORA": LoraLayer, "BOTTLENECK_ADAPTER": BottleneckAdapter}
PROMPT_ENCODERS: dict[str, type[nn.Module]] = {"PREFIX_TUNING": PrefixEncoder, "PROMPT_TUNING": PromptEmbedding}
PathLike = Union[str, os.PathLike]
# Config fields that leave what loaded weights compute unchanged: where they came from, how they started.
_PROVENANCE = ("base_model_name_or_path", "init_lora_weights")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts as its unquantized in x out elements
    (it is stored as packed bytes, which numel() would count at half, or as buffers not at all)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    """PEFT's line, character for character."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def full_finetune(model: Transformer) -> Transformer:
    """Full fine-tuning: no adapter, every parameter trains (the baseline every method is compared to)."""
    return model.requires_grad_(True)


def get_peft_model(model: Transformer, config: PeftConfig, adapter_name: str = "default") -> "PeftModel":
    """Freeze `model`, attach adapter `adapter_name` described by `config`, and make it active."""
    return PeftModel(model, config, adapter_name)


def _default_init(config: PeftConfig) -> PeftConfig:
    """The config to build an adapter whose weights a file then replaces: a LoRA init does not matter
    there, and one this library cannot run (init_lora_weights="eva": LoraLinear) must not stop the load."""
    if isinstance(config, LoraConfig) and config.init_lora_weights is not True:
        return dataclasses.replace(config, init_lora_weights=True)
    return config


def _unordered(value: object) -> object:
    """A list field compared as a set of entries: PEFT writes target_modules from a set, in any order."""
    return sorted(value) if isinstance(value, list) else value


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each one that shares storage with an earlier one copied: safetensors refuses
    aliases, and PEFT's files hold some (a modules_to_save bias under two keys)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


@contextlib.contextmanager
def _trainability_restored_on_error(model: nn.Module) -> Iterator[None]:
    """On an error inside the block, each parameter of `model` gets its requires_grad back: a refused
    get_peft_model or from_pretrained hands the caller's model back as it was, not frozen."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


class PeftModel(nn.Module):
    def __init__(self, model: Transformer, config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        self._frozen: set[str] = set()  # adapters loaded with is_trainable=False
        with _trainability_restored_on_error(model):  # add_adapter undoes its own wrapping
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
        module another method wraps, an init a layer cannot take) undoes what was attached."""
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists")
        self._check_bias(config)
        try:
            if config.is_prompt_learning:
                self.prompt_encoder[name] = PROMPT_ENCODERS[config.peft_type](config, self.base_model)
            else:
                layer_cls = LAYER_TUNERS[config.peft_type]
                layers = (getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None))
                for target in find_targets(self.base_model, config.target_modules, layer_cls, *layers):
                    self._wrap(target, layer_cls).add_adapter(name, config)
            for target in getattr(config, "modules_to_save", None) or []:
                for full in [n for n, _ in self.base_model.named_modules() if n == target or n.endswith("." + target)]:
                    self._wrap(full, ModulesToSave).add_adapter(name, config)
        except BaseException:
            self._remove_modules(name)
            raise
        self.peft_config[name] = config
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

    def _merged(self) -> list[str]:
        return sorted({a for _, layer in self.tuner_layers() for a in layer.merged_adapters})

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter. As PEFT, a merged adapter (even `name`) is unmerged first,
        with a warning, before any layer switches: `name` then runs unmerged."""
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        if self._merged():
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
            self.unmerge_adapter()
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

    def _modules_to_save_biases(self, name: str) -> dict[str, torch.Tensor]:
        """Under bias="all" PEFT saves every tensor named *bias*, so for each modules_to_save wrapper of
        adapter `name` also `<path>.original_module.<...>bias` (the frozen original) and
        `<path>.modules_to_save.<...>bias` (the copy, adapter name removed: the tensor of `<path>.<...>bias`)."""
        if getattr(self.peft_config[name], "bias", "none") != "all":
            return {}
        out = {}
        for path, layer in self.tuner_layers():
            if isinstance(layer, ModulesToSave) and name in layer.adapter_names():
                for part, module in (("original_module", layer.base_layer),
                                     ("modules_to_save", layer.modules_to_save[name])):
                    out.update({f"{PREFIX}{path}.{part}.{n}": p for n, p in module.named_parameters()
                                if n.endswith("bias")})
        return out

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
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

    # --- merging ------------------------------------------------------------------------------
    def _tied_lora_layers(self) -> list[tuple[str, LoraLayer]]:
        """The active LoRA layers whose base weight another module shares (lm_head tied to
        embed_tokens, either one targeted): ΔW merged into that tensor would move the other module too."""
        uses = Counter(id(p) for _, p in self.base_model.named_parameters(remove_duplicate=False))
        return [(path, layer) for path, layer in self.tuner_layers() if isinstance(layer, LoraLayer)
                and layer.active_adapter and layer.has_dense_weight
                and uses[id(layer.base_layer.weight)] > 1]

    def merge_adapter(self) -> None:
        """Fold the active LoRA adapter into the base weights (reversible: unmerge_adapter)."""
        if not isinstance(self.active_peft_config, LoraConfig):
            raise ValueError(f"{self.active_peft_config.peft_type} has no weight update to merge; only LoRA merges")
        tied = [path for path, _ in self._tied_lora_layers()]
        if tied:
            raise ValueError(f"{tied} share their weight with another module (tie_word_embeddings): merging ΔW into "
                             "it would change that module too; merge_and_unload() unties them first")
        for _, layer in self.tuner_layers():
            if isinstance(layer, LoraLayer) and layer.active_adapter:
                layer.merge(layer.active_adapter)

    def unmerge_adapter(self) -> None:
        for _, layer in self.tuner_layers():
            layer.unmerge()

    def merge_and_unload(self) -> Transformer:
        """The base model with the active adapter merged in and every wrapper removed: a model to save.

        Every 4-bit layer comes back as a 16/32-bit Linear holding the weight it computed with (the
        logits do not change), targeted or not: an NF4 model has no checkpoint form, and re-quantizing
        a merged weight, as PEFT does for bitsandbytes, would round most of ΔW away (LoraLinear.unloaded).
        A modules_to_save copy of lm_head or embed_tokens unties them: config.tie_word_embeddings
        is then cleared, as in PEFT, so that the checkpoint keeps both. So does LoRA on a tied
        lm_head or embed_tokens: its ΔW is merged into a copy of the shared weight, the other module
        keeps the original (PEFT merges into the shared tensor, which moves the other one too).

        Inactive adapters are dropped, as PEFT drops them, even those that could not merge (a bottleneck
        adapter beside the active LoRA one). Every refusal comes before any layer changes.
        """
        config = self.active_peft_config
        if config.is_prompt_learning:
            raise ValueError(f"{config.peft_type} adds virtual tokens; it has no weights to merge")
        if not isinstance(config, LoraConfig):
            raise ValueError(f"{config.peft_type} adapter {self.active_adapter!r} cannot be merged: it is not a "
                             "linear function of the input; unload() removes it")
        broken = [path for path, layer in self.tuner_layers() if isinstance(layer, LoraLayer) and layer.active_adapter
                  and not torch.isfinite(layer.delta_weight(layer.active_adapter)).all()]
        if broken:  # LoraLayer.merge would refuse too, but only once it reached them
            raise ValueError(f"merging adapter {self.active_adapter!r} gives non-finite weights in {broken}; "
                             "the adapter is broken")
        for _, layer in self._tied_lora_layers():
            layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)
        for path, layer in list(self.tuner_layers()):
            # Layers of another method hold only inactive adapters here (one method per module).
            set_submodule(self.base_model, path, layer.base_layer if isinstance(layer, BottleneckAdapter)
                          else layer.unloaded())
        model = dequantize_model(self.base_model)
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.config.tie_word_embeddings = False
        return model

    def unload(self) -> Transformer:
        """The base model back, every wrapper removed, nothing merged: a modules_to_save module
        comes back as the original, not the trained copy (PEFT 0.22; 0.21 returned the copy)."""
        for path, layer in list(self.tuner_layers()):
            layer.unmerge()
            set_submodule(self.base_model, path, layer.base_layer)
        return self.base_model

    # --- running --------------------------------------------------------------------------------
    @property
    def active_peft_config(self) -> PeftConfig:
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

    # --- files ----------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under PEFT's file keys."""
        if name in self.prompt_encoder:
            return self.prompt_encoder[name].adapter_state_dict()
        out = {}
        for path, layer in self.tuner_layers():
            if name in layer.adapter_names():
                out.update({f"{PREFIX}{path}.{k}": v for k, v in layer.adapter_state_dict(name).items()})
        out.update({PREFIX + n: p for n, p in self._bias_parameters(name).items()})
        out.update(self._modules_to_save_biases(name))
        return out

    def save_pretrained(self, directory: PathLike, selected_adapters: Optional[list[str]] = None) -> None:
        """The default adapter at `directory`, any other one at `directory/<name>` (PEFT's layout)."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:  # before anything is written
            raise ValueError(f"no adapter named {unknown}; adapters: {sorted(self.peft_config)}")
        for name in names:
            target = Path(directory) if name == "default" else Path(directory) / name
            tensors = _unaliased({k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict(name).items()})
            quantized = any(isinstance(m, Linear4bit) for m in self.base_model.modules())
            metadata = {"format": "pt", **({BASE_QUANTIZATION: "nf4"} if quantized else {})}
            with staged_dir(target) as tmp:  # weights and config replace the old pair together
                (tmp / WEIGHTS_NAME).write_bytes(safetensors_bytes(tensors, metadata=metadata))
                self.peft_config[name].save(tmp)

    @staticmethod
    def saved_base_quantization(directory: PathLike) -> Optional[str]:
        """"nf4" when the adapter in `directory` was saved from a model on an NF4 base (QLoRA), else
        None (a 16/32-bit base, or an adapter written by another tool, which does not record it)."""
        with open_safetensors(Path(directory) / WEIGHTS_NAME) as f:
            return (f.metadata() or {}).get(BASE_QUANTIZATION)

    @classmethod
    def from_pretrained(cls, model: Transformer, directory: PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PeftModel":
        """Attach the adapter saved in `directory` (by minipeft or by Hugging Face PEFT)."""
        config = PeftConfig.load(directory)
        config.inference_mode = not is_trainable  # as PEFT: prompt tuning skips an init the file replaces
        # The caller's model, wrapped and frozen in place, comes back bare and as trainable as it was.
        with _trainability_restored_on_error(model):
            peft_model = cls(model, _default_init(config), adapter_name)
            with peft_model._removed_on_error(adapter_name):
                peft_model.peft_config[adapter_name] = config
                peft_model.load_adapter_weights(directory, adapter_name, is_trainable)
        return peft_model.train(is_trainable)

    def load_adapter(self, directory: PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in `directory` under `adapter_name` (not made active).

        As PEFT, an existing `adapter_name` takes the file's weights instead, its trainability kept
        (is_trainable unused). Unlike PEFT, which keeps the adapter's config whatever the file's says,
        a file whose config differs is refused: its weights would run under the wrong one (scaling)."""
        config = PeftConfig.load(directory)
        if adapter_name in self.peft_config:
            self._check_reloadable(adapter_name, config, directory)
            self.load_adapter_weights(directory, adapter_name, is_trainable=adapter_name not in self._frozen)
            return
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, _default_init(config))
        with self._removed_on_error(adapter_name):
            self.peft_config[adapter_name] = config
            self.load_adapter_weights(directory, adapter_name, is_trainable)

    def _check_reloadable(self, name: str, config: PeftConfig, directory: PathLike) -> None:
        """Refuse to load the weights in `directory` (config `config`) into existing adapter `name` when it
        is merged (unmerging would then subtract the new ΔW, not the merged one) or configured otherwise."""
        if name in self._merged():
            raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() before loading weights into it")
        old, new = self.peft_config[name].to_dict(), config.to_dict()
        differ = [f"{key} {old[key]!r} here, {new.get(key)!r} in the file" for key in old
                  if key not in _PROVENANCE and _unordered(old[key]) != _unordered(new.get(key))]
        if differ:
            raise ValueError(f"{Path(directory) / CONFIG_NAME}: adapter {name!r} exists with another config: "
                             f"{'; '.join(differ)}; delete_adapter({name!r}) first, or load it under another name")

    @contextlib.contextmanager
    def _removed_on_error(self, name: str) -> Iterator[None]:
        """A load refused after adapter `name` was attached takes it off again: no half-loaded adapter
        (its init weights) stays behind under a name a retry would find taken."""
        try:
            yield
        except BaseException:
            self._remove_modules(name)
            self.peft_config.pop(name, None)
            self._frozen.discard(name)
            raise

    def load_adapter_weights(self, directory: PathLike, name: str, is_trainable: bool) -> None:
        """Copy `directory`'s tensors into adapter `name`, after checking every key and shape."""
        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; pickle files (adapter_model.bin) are never loaded")
        found = load_safetensors(path)
        expected = self.adapter_state_dict(name)
        # PEFT (save_embedding_layers="auto") also saves the base weight of a LoRA-targeted lm_head or
        # embed_tokens, for a resized vocabulary; like PEFT, load it into the base (unchanged otherwise).
        bases = {f"{PREFIX}{n}.base_layer.weight": m.base_layer.weight for n, m in self.tuner_layers()
                 if isinstance(m, LoraLayer) and m.has_dense_weight
                 and n.rsplit(".", 1)[-1] in ("lm_head", "embed_tokens")}
        targets = {**expected, **{k: bases[k] for k in found.keys() & bases.keys()}}
        check_state_dict({k: v.shape for k, v in targets.items()}, found, str(path))
        with torch.no_grad():
            if name in self.prompt_encoder:  # it may hold computed tensors (a folded prefix MLP)
                self.prompt_encoder[name].load_adapter_state_dict(found)
            else:
                for key, tensor in found.items():
                    targets[key].copy_(tensor)
        if is_trainable:
            self._frozen.discard(name)
        else:
            self._frozen.add(name)
        self._set_trainable(self.active_adapter)

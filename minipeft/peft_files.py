"""PeftModel's adapter folders, as Hugging Face PEFT writes them: `adapter_config.json` +
`adapter_model.safetensors`, tensor keys `base_model.model.<module path>.lora_A.weight` (the adapter
name removed), the default adapter at the folder, any other one in a sub-folder named after it.
A mixin of PeftModel (peft_model.py): save_pretrained, from_pretrained, load_adapter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

import torch
from safetensors.torch import save as safetensors_bytes

from .checkpoint import check_state_dict, load_safetensors, open_safetensors
from .files import staged_dir
from .linear4bit import Linear4bit
from .lora import LoraConfig, LoraLayer
from .model import Transformer
from .peft_config import CONFIG_NAME, PeftConfig
from .trainable import trainability_restored_on_error
from .tuner_layer import ModulesToSave

if TYPE_CHECKING:
    from .peft_model import PeftModel

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's older weights file (torch.save): refused
PREFIX = "base_model.model."
# The weights file's metadata records an NF4 base (QLoRA): the adapter was fitted to the rounded
# weights, so inference and merging must load the base the same way (saved_base_quantization).
BASE_QUANTIZATION = "minipeft.base_quantization"
PathLike = Union[str, os.PathLike]
# Config fields that leave what loaded weights compute unchanged: where they came from, how they started.
_PROVENANCE = ("base_model_name_or_path", "init_lora_weights")


def _default_init(config: PeftConfig) -> PeftConfig:
    """The config to build an adapter whose weights a file then replaces: a LoRA init does not matter
    there, and one this library cannot run (init_lora_weights="eva": LoraLinear) must not stop the load."""
    if isinstance(config, LoraConfig) and config.init_lora_weights is not True:
        return dataclasses.replace(config, init_lora_weights=True)
    return config


def unordered(value: object) -> object:
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


def adapter_directory(directory: PathLike) -> Path:
    """`directory` as a Path, or an error saying what it is instead of an adapter folder (missing, a
    file: the weights file given for its folder) before any file inside it is looked for."""
    path = Path(directory)
    if path.is_file():
        raise ValueError(f"{path}: is a file; expected the adapter directory holding {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME} (here: {path.parent})")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter directory (expected one holding {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}; minipeft reads local folders only)")
    return path


class AdapterFilesMixin:
    """PeftModel's file methods; they use its peft_config, prompt_encoder, tuner_layers(), the biases
    an adapter trains (_bias_parameters) and its add/remove/trainability methods."""

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
        if isinstance(selected_adapters, str):  # list("default") would be its letters
            raise TypeError(f"selected_adapters must be a list of adapter names, got {selected_adapters!r}; "
                            f"write [{selected_adapters!r}]")
        if Path(directory).is_file():  # as PEFT
            raise ValueError(f"{directory}: is a file; save_pretrained writes a directory")
        if not self.peft_config:
            raise ValueError("no adapter to save: every adapter was deleted")
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
        config = PeftConfig.load(adapter_directory(directory))
        config.inference_mode = not is_trainable  # as PEFT: prompt tuning skips an init the file replaces
        # The caller's model, wrapped and frozen in place, comes back bare and as trainable as it was.
        with trainability_restored_on_error(model):
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
        config = PeftConfig.load(adapter_directory(directory))
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
                  if key not in _PROVENANCE and unordered(old[key]) != unordered(new.get(key))]
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
            pickled = path.with_name(PICKLE_NAME)
            if pickled.exists():  # PEFT loads it with torch.load; minipeft loads no pickle (as checkpoint.py)
                raise FileNotFoundError(f"{path}: missing; found {pickled}: a pickle file, never loaded (unpickling "
                                        "can run arbitrary code): convert it to safetensors where you trust it, e.g. "
                                        "safetensors.torch.save_file(torch.load(f, weights_only=True), ...)")
            raise FileNotFoundError(f"{path}: missing; pickle files ({PICKLE_NAME}) are never loaded")
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

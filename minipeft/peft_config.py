"""The base of every method's config and its `adapter_config.json`, in Hugging Face PEFT's format.

A config is a dataclass; `peft_type` names the method ("LORA", "PREFIX_TUNING", ...). Reading a
file written by PEFT, a field of PEFT's we do not implement is accepted only while it holds PEFT's
default value: an adapter that relies on a feature we lack (DoRA, rank_pattern, ...) is refused with
the field's name, rather than loaded and silently wrong. A field PEFT 0.22 does not know either (from
a newer PEFT, or misspelt) is dropped with a warning naming it, as PEFT drops it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from .files import read_json, write_atomic

CONFIG_NAME = "adapter_config.json"
_REGISTRY: dict[str, type["PeftConfig"]] = {}

# PEFT fields we do not model, with the values under which ignoring them changes nothing.
_HARMLESS_DEFAULTS: dict[str, tuple] = {
    "alpha_pattern": ({}, None), "rank_pattern": ({}, None), "use_dora": (False, None),
    "fan_in_fan_out": (False,),
    "lora_bias": (False,), "target_parameters": (None, []), "trainable_token_indices": (None,),
    "layer_replication": (None,), "exclude_modules": (None, []), "use_qalora": (False,),
    "alora_invocation_tokens": (None,), "use_bdlora": (None, False), "megatron_config": (None,),
    "loftq_config": ({}, None), "corda_config": (None,), "arrow_config": (None,),
    "kasa_config": (None,), "lora_ga_config": (None,), "monteclora_config": (None,), "velora_config": (None,),
    "ensure_weight_tying": (False,), "num_transformer_submodules": (1, None), "astra_config": (None,),
    # PEFT 0.2 (alpaca-lora's era): LoRA on slices of a fused qkv Linear; gone since, and None there.
    "enable_lora": (None,),
}
# Bookkeeping fields with no effect on the numbers (eva_config only parameterizes an initialization, which
# a loaded adapter's weights replace; get_peft_model refuses init_lora_weights="eva" itself; PEFT 0.2's
# merge_weights merged LoRA into W on eval(), the same function).
_IGNORED = {"eva_config", "peft_version", "auto_mapping", "revision", "inference_mode", "megatron_core",
            "qalora_group_size", "merge_weights"}


@dataclasses.dataclass
class PeftConfig:
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: Optional[str] = None
    peft_type: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False  # prefix/prompt tuning: act on inputs, not on layers

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.peft_type:
            _REGISTRY[cls.peft_type] = cls

    def _check_positive_int(self, field: str) -> None:
        """A ValueError naming the field unless it holds a positive integer: True (an int to Python)
        and 2.0 are refused, as they would be read as 1 and fail later inside torch."""
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(self).__name__}: {field} must be a positive integer, got {value!r}")

    @property
    def virtual_tokens(self) -> int:
        """Positions the method puts before every input, which the real tokens' positions follow
        (prefix/prompt tuning: num_virtual_tokens); they count against the model's context. 0 here."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = CONFIG_NAME) -> "PeftConfig":
        """Build the config of `d["peft_type"]`, refusing features this library does not implement."""
        peft_type = d.get("peft_type")
        if peft_type not in _REGISTRY:
            raise ValueError(f"{where}: peft_type {peft_type!r} is not supported; expected one of {sorted(_REGISTRY)}")
        klass = _REGISTRY[peft_type]
        names = {f.name for f in dataclasses.fields(klass)}
        kwargs, unsupported, unknown = {}, [], []
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key in _HARMLESS_DEFAULTS:
                if value not in _HARMLESS_DEFAULTS[key]:
                    unsupported.append(f"{key}={value!r}")
            elif key not in _IGNORED and key != "peft_type":
                unknown.append(key)
        if unsupported:
            raise ValueError(f"{where}: fields not supported by minipeft: {', '.join(unsupported)}")
        if unknown:  # PEFT's own warning (PeftConfigMixin.from_peft_type), which assumes defaults are meant
            warnings.warn(f"{where}: Unexpected keyword arguments {sorted(unknown)} for class {klass.__name__}, "
                          "these are ignored (fields of a newer PEFT, or misspelt: PEFT 0.22 ignores them too)")
        try:
            return klass(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def save(self, directory: Union[str, os.PathLike]) -> None:
        write_atomic(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @staticmethod
    def load(directory: Union[str, os.PathLike]) -> "PeftConfig":
        path = Path(directory) / CONFIG_NAME
        return PeftConfig.from_dict(read_json(path, f"an adapter directory needs {CONFIG_NAME}"), where=str(path))

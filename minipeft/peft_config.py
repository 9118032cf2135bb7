"""The base of every method's config and its `adapter_config.json`, in Hugging Face PEFT's format.

A config is a dataclass; `peft_type` names the method ("LORA", "PREFIX_TUNING", ...). Reading a
file written by PEFT, a field of PEFT's we do not implement is accepted only while it holds PEFT's
default value: an adapter that relies on a feature we lack (DoRA, lora_bias, ...) is refused with
the field's name and value, rather than loaded and silently wrong. Passed in Python (LoraConfig(use_dora=
True)), such a field meets the same check. A field PEFT 0.22's class does not have either (another method's,
a newer PEFT's, or misspelt) is dropped from a file with a warning naming it, as PEFT drops it (in Python: a
TypeError).
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

# A PEFT field a config class takes without modelling it (the class's peft_fields) maps to the values under
# which ignoring it changes nothing on LLaMA, or to ANY (no value does). Each class lists exactly the fields its
# PEFT 0.22 class has (tests/test_peft_config.py compares), so another method's field (PrefixTuningConfig(
# use_dora=False)) is the TypeError PEFT raises, and is dropped from a file with PEFT's warning.
ANY = None
# PEFT 0.2's LoRA fields (alpaca-lora's era), gone from PEFT since, read from files only: enable_lora put LoRA on
# slices of a fused qkv Linear (None: not); merge_weights merged LoRA into W on eval(), the same function.
_PEFT_0_2 = {"enable_lora": (None,), "merge_weights": ANY}
# PEFT's task types; on a causal LM every one gives the same LoRA model (PEFT's task classes all return the
# causal LM's logits), so the field is metadata for LoRA. Prompt learning checks its own (PromptLearningConfig).
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class _ConfigMeta(type):
    """Lets a config class take PEFT's fields it does not model, as keywords: each is checked against the
    values under which ignoring it changes nothing, and refused otherwise, naming the field and value."""

    def __call__(cls, *args: Any, **kwargs: Any) -> "PeftConfig":
        extra = _take_unmodelled(cls, kwargs, cls.peft_fields)
        if extra.get("fan_in_fan_out"):  # PEFT's own warning and correction, for any nn.Linear/Embedding target
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
        # PEFT's warning; the value is dropped, as PEFT sets it {}. init_lora_weights="loftq" is refused itself.
        if extra.get("loftq_config") and kwargs.get("init_lora_weights") != "loftq":
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
        config = super().__call__(*args, **kwargs)
        if extra.get("inference_mode"):
            config.inference_mode = True
        return config


def _take_unmodelled(cls: type, kwargs: dict[str, Any], table: dict[str, Optional[tuple]]) -> dict[str, Any]:
    """Pop the keywords of `table` that are not fields of `cls` out of kwargs and return them; a ValueError
    naming each field and value that ignoring would change (one not in its table entry, unless ANY)."""
    own = {f.name for f in dataclasses.fields(cls)}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in table and k not in own}
    unsupported = [f"{k}={v!r}" for k, v in extra.items() if table[k] is not ANY and v not in table[k]]
    if unsupported:
        raise ValueError(f"{cls.__name__}: fields not supported by minipeft: {', '.join(unsupported)}")
    return extra


@dataclasses.dataclass
class PeftConfig(metaclass=_ConfigMeta):
    task_type: Optional[str] = "CAUSAL_LM"  # one of TASK_TYPES
    base_model_name_or_path: Optional[str] = None
    peft_type: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False  # prefix/prompt tuning: act on inputs, not on layers
    # PEFT's inference_mode: True, the adapter is built frozen (0 trainable parameters). Not a field: a file's
    # value is not used (from_pretrained's is_trainable decides, as in PEFT) and is not written.
    inference_mode: ClassVar[bool] = False
    # PEFT's PeftConfig fields, on every class: provenance (peft_version, auto_mapping, revision), and
    # inference_mode, kept apart above. A subclass adds its PEFT class's own.
    peft_fields: ClassVar[dict[str, Optional[tuple]]] = dict.fromkeys(
        ("peft_version", "auto_mapping", "revision", "inference_mode"), ANY)

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:  # as PEFT's PeftConfig.__post_init__
            raise ValueError(f"{type(self).__name__}: task_type must be one of {TASK_TYPES}, got {self.task_type!r}")

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

    def check_model(self, model: Any) -> None:
        """Checks against the model this config is attached to (PeftModel.add_adapter), before anything is."""

    def for_module(self, name: str) -> "PeftConfig":
        """The config that applies to the module at path `name` (LoRA's rank_pattern); here, this one."""
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = CONFIG_NAME) -> "PeftConfig":
        """Build the config of `d["peft_type"]`, refusing features this library does not implement."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object of config fields, got {type(d).__name__}")
        peft_type = d.get("peft_type")
        if peft_type not in _REGISTRY:
            raise ValueError(f"{where}: peft_type {peft_type!r} is not supported; expected one of {sorted(_REGISTRY)}")
        klass = _REGISTRY[peft_type]
        names = {f.name for f in dataclasses.fields(klass)} | set(klass.peft_fields) | set(_PEFT_0_2)
        # inference_mode: PEFT writes True in every file; the loader's is_trainable decides instead
        kwargs = {k: v for k, v in d.items() if k in names and k != "inference_mode"}
        unknown = [k for k in d if k not in names and k != "peft_type"]
        if unknown:  # PEFT's own warning (PeftConfigMixin.from_peft_type), which assumes defaults are meant
            warnings.warn(f"{where}: Unexpected keyword arguments {sorted(unknown)} for class {klass.__name__}, "
                          "these are ignored (fields of a newer PEFT, or misspelt: PEFT 0.22 ignores them too)")
        try:
            _take_unmodelled(klass, kwargs, _PEFT_0_2)
            return klass(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def save(self, directory: Union[str, os.PathLike]) -> None:
        # Fields sorted as PEFT writes them, but not the keys inside one: LoRA's rank_pattern and alpha_pattern
        # take their first matching key, so their order is part of their meaning.
        fields = dict(sorted(self.to_dict().items()))
        write_atomic(Path(directory) / CONFIG_NAME, json.dumps(fields, indent=2) + "\n")

    @staticmethod
    def load(directory: Union[str, os.PathLike]) -> "PeftConfig":
        path = Path(directory) / CONFIG_NAME
        return PeftConfig.from_dict(read_json(path, f"an adapter directory needs {CONFIG_NAME}"), where=str(path))

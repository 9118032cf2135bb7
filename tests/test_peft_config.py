"""adapter_config.json fields from other PEFT versions: accepted while they cannot change the numbers."""
import dataclasses
import json

import pytest

from minipeft.adapter import AdapterConfig
from minipeft.lora import LoraConfig
from minipeft.peft_config import ANY, PeftConfig
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
import minipeft.peft_model  # noqa: F401  (registers every method's config)

import peft

# The adapter_config.json of tloen/alpaca-lora-7b, written by PEFT 0.2 (early 2023) and still common on the Hub.
PEFT_0_2_LORA = {
    "base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none", "enable_lora": None,
    "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05,
    "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM",
}


def write(tmp_path, fields):
    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    return tmp_path


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")
def test_a_peft_0_2_lora_config_loads(tmp_path):
    """PEFT 0.2's enable_lora (None: no fused-qkv slicing) and merge_weights (merge on eval(): the same
    function) are gone from PEFT; today's PEFT loads such files, ignoring them, and so must we."""
    write(tmp_path, PEFT_0_2_LORA)
    ref = peft.PeftConfig.from_pretrained(str(tmp_path))
    ours = PeftConfig.load(tmp_path)
    for field in ("r", "lora_alpha", "lora_dropout", "bias", "modules_to_save"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert set(ours.target_modules) == ref.target_modules  # PEFT holds a set
    # enable_lora=[True, False, True] put LoRA on the q and v slices of a fused qkv projection only.
    write(tmp_path, {**PEFT_0_2_LORA, "enable_lora": [True, False, True]})
    with pytest.raises(ValueError, match=r"not supported by minipeft: enable_lora=\[True, False, True\]"):
        PeftConfig.load(tmp_path)


def test_fields_peft_does_not_know_are_dropped_with_a_warning_as_peft(tmp_path):
    """A config written by a newer PEFT holds fields PEFT 0.22 does not know: it drops them, warning with
    their names, and loads (a misspelt field too: it cannot tell them apart). minipeft refused the file.
    Fields PEFT knows and minipeft does not implement are still refused unless harmless (use_dora)."""
    write(tmp_path, {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"],
                     "use_future_thing": True, "lora_alpah": 32})
    for load in (lambda: peft.PeftConfig.from_pretrained(str(tmp_path)), lambda: PeftConfig.load(tmp_path)):
        with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['lora_alpah', 'use_future_thing'\] "
                                             "for class LoraConfig, these are ignored"):
            config = load()
        assert (config.r, config.lora_alpha) == (4, 16)


def test_an_empty_exclude_modules_loads_as_peft(tmp_path):
    """PEFT writes exclude_modules=[] for an empty set and excludes nothing with it (as None); minipeft
    refused the file. (A non-empty one: test_lora_options.test_exclude_modules_equal_peft.)"""
    peft.LoraConfig(r=4, target_modules=["q_proj"], exclude_modules=[]).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["exclude_modules"] == []
    assert PeftConfig.load(tmp_path).target_modules == ["q_proj"]


@pytest.mark.parametrize("make, field", [
    (lambda v: LoraConfig(r=v), "r"),
    (lambda v: AdapterConfig(bottleneck_size=v), "bottleneck_size"),
    (lambda v: AdapterConfig(reduction_factor=v), "reduction_factor"),
    (lambda v: PrefixTuningConfig(num_virtual_tokens=v), "num_virtual_tokens"),
    (lambda v: PromptTuningConfig(num_virtual_tokens=v), "num_virtual_tokens"),
])
@pytest.mark.parametrize("value", [True, 2.0, 0, -1, "8"])
def test_sizes_must_be_positive_integers(make, field, value):
    """True is an int to Python and was taken as a size of 1 (a bottleneck of True crashed inside
    nn.Linear); 2.0 got as far as torch.empty. Each is refused, naming the field."""
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer, got {value!r}"):
        make(value)


# Each minipeft config class and the PEFT 0.22 class whose fields it takes (AdapterConfig: PEFT's base only).
PEFT_CLASSES = [(LoraConfig, peft.LoraConfig, {}),
                (PrefixTuningConfig, peft.PrefixTuningConfig, {"num_virtual_tokens": 2}),
                (PromptTuningConfig, peft.PromptTuningConfig, {"num_virtual_tokens": 2}),
                (AdapterConfig, peft.PeftConfig, {"bottleneck_size": 8})]


def names(klass):
    return {f.name for f in dataclasses.fields(klass)} - {"peft_type"}


@pytest.mark.parametrize("ours, ref, needed", PEFT_CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_each_class_takes_exactly_its_peft_class_fields(ours, ref, needed, tmp_path):
    """One table of PEFT fields for every class made PrefixTuningConfig(use_dora=False) pass where PEFT's
    PrefixTuningConfig raises TypeError. A class now takes its PEFT class's fields it does not model, and
    another class's field is PEFT's TypeError in Python, and PEFT's warning and drop in a file."""
    assert set(ours.peft_fields) == names(ref) - names(ours)
    if ref is not peft.PeftConfig:  # a PEFT method: every field of ours is one of PEFT's too
        assert names(ours) <= names(ref)
    # every class's fields, each at a value harmless where it belongs
    others = {k: None if v is ANY else v[0] for other, _, _ in PEFT_CLASSES for k, v in other.peft_fields.items()}
    foreign = sorted(set(others) - names(ours) - set(ours.peft_fields))
    assert foreign
    for field in foreign:
        for klass in (ref, ours):
            with pytest.raises(TypeError, match=rf"unexpected keyword argument '{field}'"):
                klass(**{field: others[field]})
    write(tmp_path, {"peft_type": ours.peft_type, **needed, foreign[0]: others[foreign[0]]})
    with pytest.warns(UserWarning, match=rf"Unexpected keyword arguments \['{foreign[0]}'\] for class {ours.__name__}"):
        assert PeftConfig.load(tmp_path) == ours(**needed)

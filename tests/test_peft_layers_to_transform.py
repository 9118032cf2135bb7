"""LoRA's layers_to_transform / layers_pattern (LoRA on some decoder layers only) against Hugging Face PEFT
0.22: the same targeted modules, the same logits with the same weights, files that load both ways."""
import json
import re
import warnings

import pytest
import torch

import peft

from minipeft.lora import LoraConfig
from minipeft.peft_model import PeftModel, get_peft_model
from conftest import same_random_adapter, tiny_model, to_hf

IDS = torch.randint(0, 131, (2, 7), generator=torch.Generator().manual_seed(0))
CASES = {
    "int": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    "list-pattern": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers"),
    "pattern-list": dict(target_modules=["k_proj"], layers_to_transform=[1], layers_pattern=["h", "layers"]),
    # a full module name is taken as it is, whatever its layer (PEFT filters suffix matches only)
    "full-name": dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),
    # embed_tokens sits in no layer: excluded once layers are given
    "embed_tokens": dict(target_modules=["embed_tokens", "o_proj"], layers_to_transform=[0]),
    "empty-list": dict(target_modules=["q_proj"], layers_to_transform=[]),  # every layer, as None
}


def models(case: str):
    """minipeft's and PEFT's model for CASES[case] with the same non-zero LoRA weights."""
    cfg = dict(r=2, lora_alpha=4, **CASES[case])
    ours = get_peft_model(tiny_model(), LoraConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that embed_tokens' table will be saved too
        ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(**cfg))
    same_random_adapter(ours, ref, std=0.1)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_modules_and_logits_as_peft_and_files_both_ways(case, tmp_path):
    ours, ref = models(case)
    assert sorted(n for n, _ in ours.tuner_layers()) == sorted(ref.targeted_module_names)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["layers_to_transform"], saved["layers_pattern"]) == (
        CASES[case]["layers_to_transform"], CASES[case].get("layers_pattern"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(to_hf(tiny_model()), tmp_path / "ours",
                                                strict_adapter_check="error").eval()
        ref.save_pretrained(tmp_path / "ref")
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "ref")
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields, message", [
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "need target_modules to be a list of names"),
    (dict(target_modules="all-linear", layers_to_transform=[]), "need target_modules to be a list of names"),
    (dict(target_modules=r".*q_proj", layers_pattern=""), "need target_modules to be a list of names"),
])
def test_configs_peft_refuses_are_refused(fields, message):
    with pytest.raises(ValueError):
        peft.LoraConfig(**fields)
    with pytest.raises(ValueError, match=f"LoraConfig: .*{message}"):
        LoraConfig(**fields)


@pytest.mark.parametrize("value", ["0", 1.0, True, [0, "1"], [True]])
def test_layers_to_transform_must_hold_layer_indices(value):
    message = "layers_to_transform must be an int or a list of ints, got " + re.escape(repr(value))
    with pytest.raises(ValueError, match=message):
        LoraConfig(layers_to_transform=value)


def test_layers_that_leave_no_target_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] with layers_to_transform=5 matched no module"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], layers_to_transform=5))

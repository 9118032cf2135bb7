"""Presets and the Hugging Face config round trip."""
import pytest
import torch

from minipeft import PRESETS, ModelConfig, Transformer


@pytest.mark.parametrize("name,expected", [
    ("llama-2-7b", 6_738_415_616),
    ("qwen2-0.5b", 494_032_768),  # tied embeddings counted once
    ("tinyllama-1.1b", 1_100_048_384),
])
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_round_trips(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())  # no memory allocated
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_agree_with_transformers_config(name):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_preset(name)
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hf)
        ours = Transformer(cfg)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        ModelConfig.from_hf_config({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(KeyError, match="available"):
        ModelConfig.from_preset("llama-9")

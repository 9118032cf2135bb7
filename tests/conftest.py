"""Shared fixtures: tiny configs and the bridge to `transformers` (a test-only reference)."""
from __future__ import annotations

import pytest
import torch

from minipeft import ModelConfig, Transformer

# One tiny config per family the decoder claims: multi-head LLaMA, grouped-query LLaMA,
# Mistral (with a sliding window shorter than the test sequences, so the window matters),
# Qwen2 (q/k/v bias, tied embeddings). Odd-ish sizes catch reshape bugs.
TINY = {
    "llama-mha": dict(model_type="llama", vocab_size=131, hidden_size=48, intermediate_size=80,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa": dict(model_type="llama", vocab_size=131, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0),
    "mistral": dict(model_type="mistral", vocab_size=131, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "qwen2": dict(model_type="qwen2", vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, rope_theta=1000000.0),
}


def tiny_config(name: str = "llama-gqa", **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY[name], **overrides})


def tiny_model(name: str = "llama-gqa", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(name, **overrides))
    with torch.no_grad():  # random biases and norm weights, so a wrongly mapped tensor shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(mean=1.0 if "norm" in n else 0.0, std=0.1)
    return model.eval()


def to_hf(model: Transformer):
    """The equivalent `transformers` model, with our weights copied in by name."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(**model.config.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(next(model.parameters()).dtype).eval()


@pytest.fixture(params=sorted(TINY))
def family(request) -> str:
    return request.param

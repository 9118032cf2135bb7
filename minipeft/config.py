"""Model configuration: the LLaMA family's hyper-parameters under Hugging Face's field names.

One dataclass covers LLaMA, Mistral and Qwen2: they differ only in the fields below (Qwen2 adds
q/k/v biases and usually ties the embeddings; Mistral may use a sliding attention window).
`from_hf_config` / `to_hf_config` convert to and from a checkpoint's `config.json`, so a
directory saved here loads in `transformers` and the reverse.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from .rope_scaling import check_rope_scaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# What each family's transformers class hard-codes, whatever config.json says: LlamaForCausalLM has no
# sliding window, MistralForCausalLM no biases, Qwen2ForCausalLM always q/k/v biases (its windows, per
# layer, are refused). Any other value would be a model that its saved config.json does not describe.
FAMILY_FIXED: dict[str, dict[str, Any]] = {
    "llama": {"sliding_window": None},
    "mistral": {"attention_bias": False},
    "qwen2": {"attention_bias": True, "sliding_window": None},
}
# transformers' defaults for fields that a config.json leaves out, where they differ from ModelConfig's
# (LlamaConfig, MistralConfig, Qwen2Config in transformers 5): a hand-written or converted config.json
# must mean what it means there. Qwen2Config's num_key_value_heads (32 whatever the number of query heads)
# is left out: under any other head count it builds a model that cannot run.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(intermediate_size=14336, num_key_value_heads=8, rms_norm_eps=1e-6,
                    max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None),
}

# hidden_act values that transformers' ACT2FN maps to SiLU, x·sigmoid(x): SwiGLU's gate, the only one here
SILU_NAMES = ("silu", "swish")


def _check_token_ids(cfg: "ModelConfig") -> None:
    """The types transformers' config classes allow: bos/pad an int or None, eos also a list of ints
    (any of them ends a sequence). bool is refused: True is an int in Python, not a token id."""
    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, field)
        if value is None or is_id(value) or (field == "eos_token_id" and isinstance(value, list)
                                             and value and all(map(is_id, value))):
            continue
        expected = "an integer token id, a non-empty list of them, or null" if field == "eos_token_id" else \
            "an integer token id or null (transformers takes no list here; only eos_token_id may be one)"
        raise ValueError(f"{field} must be {expected}, got {value!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096  # d_model
    intermediate_size: int = 11008  # SwiGLU hidden width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # GQA groups; None means multi-head (= num_attention_heads)
    head_dim: Optional[int] = None  # None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None  # None: plain RoPE; "linear" or "llama3" (rope_scaling.py)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    attention_bias: bool = False  # bias on q/k/v (Qwen2: always; LLaMA: on o_proj too; Mistral: never)
    model_type: str = "llama"  # "llama" | "mistral" | "qwen2": decides the checkpoint's architecture name
    sliding_window: Optional[int] = None  # Mistral: a query sees at most this many keys (itself included)
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list[int]]] = 2  # a list: any of them ends a sequence
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for field, value in FAMILY_FIXED[self.model_type].items():
            if getattr(self, field) != value:
                raise ValueError(f"model_type {self.model_type!r}: {field} must be {value} (transformers' "
                                 f"{self.model_type} class has no other), got {getattr(self, field)}")
        if self.model_type == "llama" and self.hidden_size % self.num_attention_heads:
            # LlamaConfig (transformers 5) refuses it even with head_dim given: the checkpoint would not load
            # there. MistralConfig and Qwen2Config take it (head_dim = hidden_size // heads, or as given).
            raise ValueError(f"model_type 'llama': hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads}), as transformers' LlamaConfig "
                             f"requires even with head_dim given (mistral and qwen2 take it)")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        _check_token_ids(self)

    @property
    def o_proj_bias(self) -> bool:
        """HF LLaMA puts `attention_bias` on all four projections; Qwen2 only on q, k, v."""
        return self.attention_bias and self.model_type != "qwen2"

    # --- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a `config.json` dict (model_type llama, mistral or qwen2), read as transformers reads
        it: a missing key takes the family's default there (HF_DEFAULTS), a key the family's class ignores
        is ignored (FAMILY_FIXED)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        # transformers 4.x writes rope_theta (+ rope_scaling); 5.x nests both in rope_parameters.
        rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        if "original_max_position_embeddings" in hf and rope.get("rope_type", rope.get("type")) == "llama3":
            # transformers (standardize_rope_params) takes the top-level key, Phi-3's place for it, over the
            # one in rope_parameters
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        if hf.get("hidden_act", "silu") not in SILU_NAMES:
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses 'silu'; "
                             f"expected one of {SILU_NAMES}, the names transformers gives it)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {**HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if k in names}}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        try:
            kwargs["rope_scaling"] = check_rope_scaling(rope, kwargs.get("max_position_embeddings"))
        except ValueError as e:
            raise ValueError(f"config.json: {e}") from None
        if model_type == "qwen2" and hf.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true (Qwen2 per-layer windows) is not supported")
        kwargs.update(FAMILY_FIXED[model_type])  # keys the family's transformers class ignores
        if hf.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"config.json: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers.AutoConfig` reads back to an equal model."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        hf = dataclasses.asdict(self)
        hf.update(architectures=[arch[self.model_type]], hidden_act="silu", initializer_range=0.02)
        if self.model_type == "qwen2":
            del hf["attention_bias"]
            hf["use_sliding_window"] = False
        if self.model_type == "llama":
            hf.pop("sliding_window")
            hf["mlp_bias"] = False
        return hf

    # --- presets ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """A config copied from a public model's `config.json` (see PRESETS)."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**PRESETS[name])


_QWEN = dict(model_type="qwen2", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
             bos_token_id=151643, eos_token_id=151643)
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf, Llama-2-13b-hf
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    # meta-llama/Llama-3.2-1B: grouped-query attention, tied embeddings, "llama3" RoPE scaling (rope_scaling.py)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
                         eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192}),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # Qwen/Qwen2-0.5B, Qwen2-1.5B, Qwen2-7B, Qwen2.5-3B
    "qwen2-0.5b": dict(_QWEN, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072,
                       tie_word_embeddings=True),
    "qwen2-1.5b": dict(_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                       tie_word_embeddings=True),
    "qwen2-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072),
    "qwen2.5-3b": dict(_QWEN, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True),
}

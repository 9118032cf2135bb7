"""Shared fixtures: tiny configs and the bridge to `transformers` (a test-only reference)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from minipeft import ModelConfig, Transformer
from minipeft.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

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
    import transformers
    hf_cfg = transformers.AutoConfig.for_model(**model.config.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(next(model.parameters()).dtype).eval()



@torch.no_grad()
def same_random_adapter(ours, ref, std: float, only: str | None = None) -> None:
    """Draw minipeft's trainable weights (or those whose name holds `only`, trainable or not) from
    N(0, std^2) and copy each into PEFT's model `ref` (B != 0: the adapter shows in the output)."""
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if (only in name) if only is not None else p.requires_grad:
            p.normal_(std=std)
            ref_params[name.replace("base_model.", "base_model.model.", 1)].copy_(p)  # PEFT nests once more

@pytest.fixture(params=sorted(TINY))
def family(request) -> str:
    return request.param


# --- a tiny sentencepiece tokenizer and a tiny model directory, for tests that need real text ---
WORDS = ("the quick brown fox jumps over a lazy dog hello world what is why how answer question user "
         "assistant system you are helpful please tell me about "
         "你好 世界 中文 测试 模型 微调 数据").split()
VOCAB = 384  # 4 control + 2 chat tokens + 256 bytes + ~60 characters + learned pieces


def write_corpus(path: Path, seed: int = 0, lines: int = 400) -> Path:
    """Sentences of WORDS plus the template scaffolding ([INST], User:, ...), one a line."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "shi", "van", "or", "el", "qua", "zo", "ing"]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(150)]
    extra = ["[INST]", "[/INST]", "<<SYS>>", "User:", "Assistant:", "###", "1234", "3.14,", "!?"] + made_up
    text = "\n".join(" ".join(rng.choice(WORDS + extra) for _ in range(rng.randint(3, 14))) for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def train_tiny(directory: Path, **kwargs) -> Tokenizer:
    directory.parent.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(directory.parent / f"{directory.name}.txt")
    return train_tokenizer([corpus], directory, kwargs.pop("vocab_size", VOCAB), **kwargs)


def save_tiny_base(folder: Path, **overrides) -> Path:
    """A Hugging Face directory with a tiny tokenizer and a tiny random LLaMA of matching vocabulary."""
    tok = train_tiny(folder)
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
               tie_word_embeddings=True)
    Transformer(ModelConfig(**{**cfg, **overrides})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tiny(directory)
    return directory


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a machine with two GPUs (a stand-in: tensors stay on the CPU); the devices
    made current are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):  # the host's would pick the GPU
        monkeypatch.delenv(name, raising=False)
    return current


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): on two shared
    cores, two torch threads contend with other processes and small models run ~10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

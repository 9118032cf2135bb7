"""Hugging Face checkpoint directories: both directions with `transformers`, shards, and errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipeft import load_pretrained
from conftest import tiny_model, to_hf


def test_saved_directory_loads_in_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert hf.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_transformers_directory_loads_here(family, tmp_path):
    hf = to_hf(tiny_model(family, seed=5))
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_round_trip_and_dtype(tmp_path):
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "m", max_shard_size=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), n
    # Re-saving as one file removes the stale shards and index.
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_errors_name_the_problem(tmp_path):
    model = tiny_model("llama-gqa")
    d = tmp_path / "m"
    model.save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(1)
    del tensors["model.norm.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "missing tensors: ['model.norm.weight']" in msg
    assert "unexpected tensors: ['model.extra.weight']" in msg
    assert "model.layers.0.mlp.up_proj.weight: expected (96, 64), found (3, 3)" in msg

    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_pretrained(d)
    (d / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="gpt_neox"):
        load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import minipeft.checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        tiny_model().save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []

"""LoRA interop with Hugging Face `peft` (test-only): same weights, same logits, files both ways."""
import json

import pytest
import torch

from minipeft import load_pretrained
from minipeft.lora import LoraConfig
from minipeft.peft_model import PeftModel, get_peft_model
from conftest import same_random_adapter, tiny_model, to_hf
from test_lora import IDS, trained

import peft
from safetensors.torch import load_file

CASES = {
    "outline": dict(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    "all-linear-rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "regex-bias-lm_head": dict(r=2, lora_alpha=4, target_modules=r".*\.(k_proj|up_proj)", bias="lora_only",
                               modules_to_save=["lm_head"]),
    # bias="all" reaches the bias inside a modules_to_save copy (Qwen2's q_proj has one)
    "bias-all-mts-q_proj": dict(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["q_proj"], bias="all"),
}


def _peft_reference(family):
    return to_hf(tiny_model(family))


@pytest.mark.parametrize("case", sorted(CASES))
def test_minipeft_adapter_loads_in_peft(case, family, tmp_path):
    ours, _ = trained(LoraConfig(**CASES[case]), family=family)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(_peft_reference(family), tmp_path).eval()
    with torch.no_grad():
        # float32; both compute x Wᵀ + s (x Aᵀ) Bᵀ in the same order: observed ~1e-7.
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_minipeft(case, tmp_path):
    ref = peft.get_peft_model(_peft_reference("qwen2"), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.05)  # B != 0, so the adapter matters
    ref.eval().save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default


def test_same_weights_same_logits_and_parameter_counts():
    cfg = CASES["outline"]
    ours = get_peft_model(tiny_model("llama-gqa"), LoraConfig(**cfg))
    ref = peft.get_peft_model(_peft_reference("llama-gqa"), peft.LoraConfig(task_type="CAUSAL_LM", **cfg))
    same_random_adapter(ours, ref, std=0.05)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_keys_and_trainable_counts_match_peft(case, tmp_path):
    ours = get_peft_model(tiny_model("qwen2"), LoraConfig(**CASES[case]))
    ref = peft.get_peft_model(_peft_reference("qwen2"), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors import safe_open

    keys = [sorted(safe_open(str(tmp_path / d / "adapter_model.safetensors"), "pt").keys()) for d in ("ours", "ref")]
    assert keys[0] == keys[1]
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_file_layout_matches_peft(tmp_path):
    ours, _ = trained(LoraConfig(**CASES["outline"]))
    ours.save_pretrained(tmp_path / "ours")
    ref = peft.get_peft_model(_peft_reference("llama-gqa"), peft.LoraConfig(task_type="CAUSAL_LM",
                                                                             **CASES["outline"]))
    ref.save_pretrained(tmp_path / "ref")
    from safetensors import safe_open

    keys = [sorted(safe_open(str(tmp_path / d / "adapter_model.safetensors"), "pt").keys()) for d in ("ours", "ref")]
    assert keys[0] == keys[1]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys[0]
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "task_type"):
        assert cfg[field] == ref_cfg[field], field
    assert sorted(cfg["target_modules"]) == sorted(ref_cfg["target_modules"])


def test_loading_checks_every_key_and_shape(tmp_path):
    ours, _ = trained(LoraConfig(r=4))
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight: expected \(8, 64\), found \(4, 64\)"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="unexpected tensors: .*v_proj.lora_A.weight"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


def test_merged_checkpoint_loads_in_transformers(tmp_path):
    import transformers
    ours, _ = trained(LoraConfig(**CASES["outline"]), family="qwen2")
    expected = ours(IDS)
    ours.merge_and_unload().save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_pretrained(tmp_path)(IDS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_merged_modules_to_save_of_a_tied_model_reload_in_both(saved, tmp_path):
    """A trained copy of lm_head or embed_tokens unties them; the merged checkpoint must say so (as PEFT's
    merge_and_unload does) and keep both, or a reload ties them back to one and loses the fine-tune."""
    import transformers
    cfg = dict(r=2, target_modules=["q_proj"], modules_to_save=[saved])
    ours, _ = trained(LoraConfig(**cfg), family="qwen2")
    ref_merged = peft.get_peft_model(_peft_reference("qwen2"), peft.LoraConfig(**cfg)).merge_and_unload()
    with torch.no_grad():
        expected = ours(IDS)
        merged = ours.merge_and_unload()
        assert merged.config.tie_word_embeddings is ref_merged.config.tie_word_embeddings is False
        merged.save_pretrained(tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        # float32, the same weights read back: observed <= 4e-7 (transformers), 0 (minipeft).
        torch.testing.assert_close(hf(IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_pretrained(tmp_path)(IDS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_peft_adapter_with_a_base_preserving_init_loads(init, tmp_path):
    torch.manual_seed(0)
    ref = peft.get_peft_model(_peft_reference("qwen2"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                         init_lora_weights=init))
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    ref.eval().save_pretrained(tmp_path)  # with init "eva", PEFT writes an eva_config block too
    ours = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] == init


def test_invalid_adapter_config_names_the_file(tmp_path):
    config = {"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config\.json: LoraConfig: r must be a positive integer, got 0"):
        PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)


def test_orthogonal_init_draws_what_peft_draws():
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")
    base, ref_base = tiny_model("qwen2"), _peft_reference("qwen2")  # before seeding: building them draws too
    torch.manual_seed(3)
    ours = get_peft_model(base, LoraConfig(**cfg))
    torch.manual_seed(3)
    ref = dict(peft.get_peft_model(ref_base, peft.LoraConfig(**cfg)).named_parameters())
    lora = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    assert len(lora) == 8
    for name, p in lora.items():
        assert torch.equal(p, ref[name.replace("base_model.", "base_model.model.", 1)]), name  # same draws
        assert p.abs().min() > 0
    with torch.no_grad():  # B A = 0 up to float32 rounding: the base's logits
        torch.testing.assert_close(ours(IDS), tiny_model("qwen2")(IDS), atol=1e-5, rtol=0)


def test_peft_adapter_on_lm_head_loads_its_saved_base_weight(tmp_path):
    """With lm_head targeted, PEFT (save_embedding_layers="auto") also saves lm_head.base_layer.weight
    and loads it into the base: changed here, as a resized vocabulary changes it. minipeft refused the
    file ("unexpected tensors"); now both load it and agree."""
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    ref = peft.get_peft_model(_peft_reference("llama-gqa"), peft.LoraConfig(task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
        ref.base_model.model.lm_head.base_layer.weight.mul_(1.5)
    ref.eval().save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(_peft_reference("llama-gqa"), tmp_path).eval()
    ours = PeftModel.from_pretrained(tiny_model("llama-gqa"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, atol=1e-5, rtol=0)


def test_unload_gives_modules_to_save_back_as_the_original_as_peft(tmp_path):
    """PEFT 0.22's unload() replaces a modules_to_save wrapper by the original module (0.21 gave the
    trained copy; merge_and_unload keeps the copy in both), as minipeft's does: the same model back."""
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours = get_peft_model(tiny_model("llama-gqa"), LoraConfig(**cfg))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_peft_reference("llama-gqa"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().unload()(IDS), theirs.unload()(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("crash_at", [2, 3])
def test_saving_over_an_adapter_replaces_its_weights_and_config_together(tmp_path, monkeypatch, crash_at):
    """Re-saving an adapter of the same shapes with another lora_alpha, cut short at any rename: the
    old pair stays. Written as two files, a crash between them left the new weights under the old
    config, which loads without an error at the wrong scaling. Other files in the folder stay."""
    import os

    from minipeft import files

    target = tmp_path / "adapter"
    trained(LoraConfig(r=4, lora_alpha=8))[0].save_pretrained(target)
    (target / "model.safetensors").write_bytes(b"not the adapter's")  # a model saved beside it is kept
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    new = trained(LoraConfig(r=4, lora_alpha=32), steps=2)[0]
    real, renames = os.replace, []
    monkeypatch.setattr(files, "_RENAMEAT2", None)  # the two renames, where Linux's one-step swap is not offered

    def crash(src, dst):
        renames.append(dst)
        if len(renames) == crash_at:  # 1: the config inside the staging folder; 2, 3: the swap
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(target)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    new.save_pretrained(target)
    assert json.loads((target / "adapter_config.json").read_text())["lora_alpha"] == 32
    assert (target / "model.safetensors").read_bytes() == b"not the adapter's"
    reloaded = PeftModel.from_pretrained(tiny_model("llama-gqa"), target)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS), new(IDS), atol=0, rtol=0)


def test_a_bfloat16_layer_with_float32_adapters_equals_peft_bit_for_bit():
    """PEFT keeps adapters in float32 under a 16-bit base and adds the float32 branch to the bfloat16
    base output before casting once. Casting the branch to bfloat16 first rounds twice: 1-ulp
    differences in part of the outputs."""
    ours = get_peft_model(tiny_model("qwen2").to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8)).eval()
    ref = peft.get_peft_model(to_hf(tiny_model("qwen2")).to(torch.bfloat16),
                              peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8)).eval()
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    ref_layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    assert ref_layer.lora_A["default"].weight.dtype == layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        for ab in ("lora_A", "lora_B"):
            getattr(layer, ab)["default"].weight.normal_(std=0.3)
            getattr(ref_layer, ab)["default"].weight.copy_(getattr(layer, ab)["default"].weight)
        x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        assert torch.equal(layer(x), ref_layer(x))

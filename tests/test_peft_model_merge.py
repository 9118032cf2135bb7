"""merge_and_unload refuses before it changes anything, drops inactive adapters as PEFT does, and unties
a tied lm_head that LoRA targets."""
import pytest
import torch

from minipeft import load_pretrained
from minipeft.adapter import AdapterConfig
from minipeft.lora import LoraConfig
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.tuner_layer import TunerLayer
from conftest import tiny_model

IDS = torch.randint(0, 131, (2, 6), generator=torch.Generator().manual_seed(0))


def lora_and_bottleneck():
    """LoRA "l" on q_proj (B randomized: a non-zero update) beside a bottleneck adapter "a" on other modules."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]), "l")
    model.add_adapter("a", AdapterConfig(bottleneck_size=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "adapter_up" in name:
                p.normal_()
    return model.eval()


def snapshot(model):
    with torch.no_grad():
        logits = {name: model.set_adapter(name) or model(IDS) for name in ("l", "a")}
    tensors = {name: {k: v.detach().clone() for k, v in model.adapter_state_dict(name).items()} for name in ("l", "a")}
    return logits, tensors, [n for n, _ in model.tuner_layers()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    logits, tensors, layers, state = snapshot(model)
    assert layers == before[2]
    for name in ("l", "a"):
        assert torch.equal(logits[name], before[0][name])
        assert tensors[name].keys() == before[1][name].keys()
        assert all(torch.equal(tensors[name][k], before[1][name][k]) for k in tensors[name])
    assert all(torch.equal(state[k], before[3][k]) for k in state)


def test_an_active_unmergeable_adapter_is_refused_with_nothing_changed():
    """Before the fix the LoRA wrappers (met first) were already unloaded when the bottleneck layer raised."""
    model = lora_and_bottleneck()
    before = snapshot(model)
    model.set_adapter("a")
    with pytest.raises(ValueError, match="BOTTLENECK_ADAPTER adapter 'a' cannot be merged.*unload"):
        model.merge_and_unload()
    assert_unchanged(model, before)


def test_a_non_finite_update_is_refused_with_nothing_changed():
    model = lora_and_bottleneck()
    last = model.base_model.model.layers[-1].self_attn.q_proj
    with torch.no_grad():
        last.lora_B["l"].weight[0, 0] = float("inf")
    before = snapshot(model)
    model.set_adapter("l")
    with pytest.raises(ValueError, match=r"merging adapter 'l' gives non-finite weights in "
                                         r"\['model.layers.1.self_attn.q_proj'\]"):
        model.merge_and_unload()
    assert_unchanged(model, before)


def test_an_inactive_unmergeable_adapter_is_dropped_as_in_peft():
    """PEFT's merge_and_unload merges the active adapters and replaces every tuner layer by its base layer,
    dropping the others; here too, even a bottleneck adapter, which has nothing to merge while inactive."""
    model = lora_and_bottleneck()
    model.set_adapter("l")
    with torch.no_grad():
        expected = model(IDS)
        merged = model.merge_and_unload()
        got = merged(IDS)
    assert not any(isinstance(m, TunerLayer) for m in merged.modules())
    # float32; W + s B A folded once instead of two matmuls summed: observed ~1e-6
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_lora_on_a_tied_lm_head_merges_into_its_own_copy(tmp_path):
    """qwen2's lm_head is embed_tokens' weight. Merged into that shared tensor (as PEFT does), lm_head's
    ΔW would move every embedding too, and the merged model would not compute what base + adapter did."""
    torch.manual_seed(0)
    base = tiny_model("qwen2")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    embeddings = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        expected = model(IDS)
    with pytest.raises(ValueError, match=r"\['lm_head'\] share their weight with another module.*merge_and_unload"):
        model.merge_adapter()
    merged = model.merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, embeddings) and not merged.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)  # both matrices are written, and read back untied
    reloaded = load_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS), expected, atol=1e-5, rtol=1e-5)


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_a_refused_delete_adapter_changes_nothing():
    """delete_adapter refuses while the adapter is merged (as PEFT). Before, the layers met first had
    already lost the adapter's modules_to_save copy, while the refusal said nothing had happened.
    (set_adapter unmerges instead, as PEFT: test_peft_model_lifecycle.)"""
    model = lora_and_bottleneck()
    model.set_adapter("l")
    model.add_adapter("m", LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["embed_tokens"]))
    model.set_adapter("m")
    with torch.no_grad():
        model.base_model.model.embed_tokens.modules_to_save["m"].weight.add_(0.5)
    model.merge_adapter()
    before = (model(IDS), trainable_names(model), [n for n, _ in model.tuner_layers()])
    with pytest.raises(ValueError, match=r"adapter 'm' is merged; unmerge_adapter\(\) before deleting it"):
        model.delete_adapter("m")
    assert model.active_adapter == "m"
    assert torch.equal(model(IDS), before[0]) and trainable_names(model) == before[1]
    assert [n for n, _ in model.tuner_layers()] == before[2]


@pytest.mark.parametrize("config, message", [
    (AdapterConfig(bottleneck_size=4), "down_proj is already wrapped by LoraLinear"),  # o_proj wrapped first
    (LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights="eva"), "init_lora_weights='eva'"),
])
def test_a_refused_add_adapter_leaves_no_trace(config, message):
    """A refusal met after some layers took the new adapter undoes them: before, an unregistered
    adapter stayed on those layers, trainable, counted and handed to the optimizer."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["down_proj", "q_proj"]))
    before = (model.get_nb_trainable_parameters(), sorted(model.state_dict()), [n for n, _ in model.tuner_layers()])
    with pytest.raises(ValueError, match=message):
        model.add_adapter("new", config)
    assert "new" not in model.peft_config
    assert (model.get_nb_trainable_parameters(), sorted(model.state_dict()),
            [n for n, _ in model.tuner_layers()]) == before


def test_lora_bias_all_beside_a_bottleneck_adapter_trains_and_saves_the_base_biases_only(tmp_path):
    """bias="all" trains the base's biases; a bottleneck adapter's own biases (another adapter's
    parameters) were taken too, saved in the LoRA file, and the file then failed to reload."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    model.add_adapter("ad", AdapterConfig(bottleneck_size=4))
    biases = [n for n in trainable_names(model) if n.endswith("bias")]
    assert biases and not [n for n in biases if "adapter_" in n]
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)
    assert sorted(reloaded.adapter_state_dict("default")) == sorted(model.adapter_state_dict("default"))

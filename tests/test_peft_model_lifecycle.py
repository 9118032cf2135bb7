"""The adapter lifecycle a server switching adapters per request goes through (add, load, delete, re-add,
disable, save), against Hugging Face PEFT 0.22 on the same tiny model, and what a failed load leaves behind."""
import json
import warnings

import pytest
import torch

import peft
from safetensors.torch import load_file

from minipeft.lora import LoraConfig
from minipeft.peft_model import WEIGHTS_NAME, PeftModel, get_peft_model
from minipeft.tuner_layer import TunerLayer
from conftest import same_random_adapter, tiny_model, to_hf

IDS = torch.randint(0, 131, (2, 7), generator=torch.Generator().manual_seed(0))


def both(first: tuple[str, dict], *more: tuple[str, dict], family="llama-gqa"):
    """minipeft's and PEFT's model with the same named adapters and the same non-zero weights."""
    ours = get_peft_model(tiny_model(family), LoraConfig(**first[1]), first[0])
    ref = peft.get_peft_model(to_hf(tiny_model(family)), peft.LoraConfig(**first[1]), adapter_name=first[0])
    for name, cfg in more:
        ours.add_adapter(name, LoraConfig(**cfg))
        ref.add_adapter(name, peft.LoraConfig(**cfg))
    same_random_adapter(ours, ref, std=0.05, only=".lora_")
    return ours.eval(), ref.eval()


def saved(model, directory, adapter="default") -> dict[str, torch.Tensor]:
    model.save_pretrained(directory)
    return load_file(directory / ("" if adapter == "default" else adapter) / WEIGHTS_NAME)


def test_deleting_the_active_adapter_activates_the_one_peft_picks():
    """PEFT's layers fall back to the first remaining name in sorted order; minipeft took the first added."""
    cfg = dict(r=2, target_modules=["q_proj"])
    ours, ref = both(("z", cfg), ("m", cfg), ("b", cfg))
    ours.delete_adapter("z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns which adapter it activates
        ref.delete_adapter("z")
    assert ours.active_adapter == ref.active_adapter == "b"
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


def test_an_adapter_deleted_and_added_again_trains_as_peft(tmp_path):
    """An adapter loaded for inference (frozen), deleted, then added again under the same name with a new
    config is a new adapter: it trains. minipeft remembered the old one's frozen state by name."""
    cfg = dict(r=2, target_modules=["q_proj", "v_proj"])
    ours, ref = both(("default", cfg))
    ours.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, "x")  # is_trainable=False
    ref.load_adapter(str(tmp_path), "x")
    for model, config in ((ours, LoraConfig(**cfg)), (ref, peft.LoraConfig(**cfg))):
        model.delete_adapter("x")
        model.add_adapter("x", config)
        model.set_adapter("x")
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 2 * (2 * (64 + 64) + 2 * (64 + 16))  # x's q and v A, B


def test_a_second_adapter_with_bias_is_refused_as_peft():
    """Biases are the base's own tensors, shared by every adapter: two adapters training them would each
    change the other's (and the base's) output. PEFT allows one adapter with bias != "none"."""
    ours, ref = both(("default", dict(r=2, target_modules=["q_proj"], bias="all")), family="qwen2")
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        ref.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"], bias="lora_only"))
    with pytest.raises(ValueError, match=r"adapter 'default' already trains biases \(bias='all'\)"):
        ours.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], bias="lora_only"))
    assert list(ours.peft_config) == ["default"]
    assert not [n for n, _ in ours.tuner_layers() if "v_proj" in n]
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"]))  # bias="none": fine


def test_a_lora_target_inside_a_modules_to_save_module_is_refused_as_peft():
    """A trained copy of `mlp` would hold a copy of down_proj's LoRA wrapper: the file got keys with the
    adapter name and `.base_layer.` in them, twice over. PEFT adapts no module for this config."""
    cfg = dict(r=2, target_modules=["down_proj"], modules_to_save=["mlp"])
    with pytest.raises(ValueError):
        peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(**cfg))
    base = tiny_model()
    with pytest.raises(ValueError, match=r"modules_to_save=\['mlp'\] exclude every module target_modules="
                                         r"\['down_proj'\] selects"):  # as PEFT, LoRA never targets inside them
        get_peft_model(base, LoraConfig(**cfg))
    assert not any(isinstance(m, TunerLayer) for m in base.modules())  # the refusal undid the LoRA wrappers


def test_a_failed_load_adapter_leaves_no_adapter_behind(tmp_path):
    """A file that does not fit its config is refused; the name must stay free, and no layer keep a
    half-loaded adapter (a server retrying the load got "already exists")."""
    cfg = dict(r=2, target_modules=["q_proj", "v_proj"])
    ours, ref = both(("default", cfg))
    ours.save_pretrained(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / WEIGHTS_NAME).write_bytes((tmp_path / "good" / WEIGHTS_NAME).read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps({**json.loads(
        (tmp_path / "good" / "adapter_config.json").read_text()), "r": 4}))
    with pytest.raises(ValueError, match="shape mismatches"):
        ours.load_adapter(bad, "second")
    assert list(ours.peft_config) == ["default"]
    assert all(layer.adapter_names() == ["default"] for _, layer in ours.tuner_layers())
    ours.load_adapter(tmp_path / "good", "second")
    ref.load_adapter(str(tmp_path / "good"), "second")
    ours.set_adapter("second"), ref.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


def test_a_failed_from_pretrained_gives_the_model_back_unwrapped(tmp_path):
    """from_pretrained wraps the caller's model in place; when the file is then refused, the wrappers
    stayed, and the next from_pretrained on that model kept the failed adapter's layers: its file got
    their keys (v_proj here), which the adapter's own config then refuses to load."""
    ours, _ = both(("default", dict(r=2, target_modules=["q_proj", "v_proj"])))
    ours.save_pretrained(tmp_path / "qv")
    good, _ = both(("default", dict(r=2, target_modules=["q_proj"])))
    expected = saved(good, tmp_path / "q")
    (tmp_path / "qv" / WEIGHTS_NAME).write_bytes((tmp_path / "q" / WEIGHTS_NAME).read_bytes())  # misses v_proj

    base = tiny_model()
    with pytest.raises(ValueError, match="missing tensors: .*v_proj"):
        PeftModel.from_pretrained(base, tmp_path / "qv")
    assert not any(isinstance(m, TunerLayer) for m in base.modules())
    retry = PeftModel.from_pretrained(base, tmp_path / "q")
    assert sorted(saved(retry, tmp_path / "again")) == sorted(expected)


def test_save_pretrained_refuses_unknown_selected_adapters_before_writing(tmp_path):
    ours, ref = both(("default", dict(r=2)), ("b", dict(r=2)))
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):
        ref.save_pretrained(tmp_path / "ref", selected_adapters=["b", "nope"])
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; adapters: \['b', 'default'\]"):
        ours.save_pretrained(tmp_path / "ours", selected_adapters=["b", "nope"])
    assert not (tmp_path / "ours").exists()  # "b" was written before the KeyError on "nope"
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["b"])
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["b"]


def test_nested_disable_adapter_keeps_the_outer_block_disabled_as_peft():
    """A helper that computes base logits under disable_adapter(), called inside another such block:
    the inner exit re-enabled every layer while the outer block still expected the base model."""
    ours, ref = both(("default", dict(r=2, target_modules=["q_proj", "v_proj"])))
    with torch.no_grad():
        base, adapted = tiny_model()(IDS), ours(IDS)
        for model, logits in ((ours, lambda: ours(IDS)), (ref, lambda: ref(IDS).logits)):
            with model.disable_adapter():
                with pytest.raises(RuntimeError):
                    with model.disable_adapter():
                        raise RuntimeError("a failing request")
                torch.testing.assert_close(logits(), base, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits(), adapted, atol=1e-5, rtol=0)


def trainable_biases(model, prefix: str) -> list[str]:
    """The trainable biases' module paths (`prefix`: "base_model." for minipeft, PEFT nests once more)."""
    return sorted(n.removeprefix(prefix) for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))


def test_lora_only_trains_the_biases_of_its_own_layers_only_as_peft():
    """bias="lora_only" trains the biases of the modules its adapter wraps. minipeft took every LoRA
    wrapper's, so a second adapter on v_proj made the first one train v_proj's biases too (PEFT leaves
    the parameters already there as they were when an adapter is added)."""
    ours, ref = both(("default", dict(r=2, target_modules=["q_proj"], bias="lora_only")),
                     ("b", dict(r=2, target_modules=["v_proj"])), family="qwen2")
    assert trainable_biases(ours, "base_model.") == trainable_biases(ref, "base_model.model.") == [
        f"model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in range(2)]


def test_a_failed_from_pretrained_or_get_peft_model_leaves_the_base_trainable_as_it_was(tmp_path):
    """The caller's model came back unwrapped but frozen (requires_grad False everywhere): training it
    in full next, or building another adapter's model from it, silently trained nothing of the base.
    PEFT refuses an unknown target before it freezes anything."""
    good, _ = both(("default", dict(r=2, target_modules=["q_proj"])))
    good.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    base, ref_base = tiny_model(), to_hf(tiny_model())
    base.model.norm.requires_grad_(False)  # a caller's own choice, kept as well
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(base, tmp_path)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before
    with pytest.raises(ValueError):
        peft.get_peft_model(ref_base, peft.LoraConfig(r=2, target_modules=["nope"]))
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["nope"]))
    assert all(p.requires_grad for p in ref_base.parameters())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before


@pytest.mark.parametrize("switch_to", ["b", "default"])
def test_set_adapter_while_merged_warns_and_unmerges_first_as_peft(switch_to):
    """minipeft refused to switch while an adapter was merged; PEFT warns and unmerges, even to set the
    merged adapter again, and the newly active adapter then runs unmerged."""
    ours, ref = both(("default", dict(r=2, target_modules=["q_proj", "v_proj"])),
                     ("b", dict(r=2, target_modules=["q_proj"])))
    for model in (ours, ref):
        model.merge_adapter()
        with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model"):
            model.set_adapter(switch_to)
    assert ours.active_adapter == ref.active_adapter == switch_to
    assert not any(layer.merged_adapters for _, layer in ours.tuner_layers())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [["q_proj"], ["k_proj"]])  # on a merged module, on others only
def test_add_adapter_while_merged_warns_and_unmerges_as_peft(targets):
    """minipeft kept the merge; PEFT's add_adapter re-sets the active adapter, which warns and unmerges every
    layer (not only those the new adapter wraps): the active adapter then runs unmerged."""
    ours, ref = both(("default", dict(r=2, target_modules=["q_proj", "v_proj"])))
    for model, config in ((ours, LoraConfig), (ref, peft.LoraConfig)):
        model.merge_adapter()
        with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model"):
            model.add_adapter("b", config(r=2, target_modules=targets))
    assert ours.active_adapter == ref.active_adapter == "default"
    assert not any(layer.merged_adapters for _, layer in ours.tuner_layers())
    assert not any(m.merged_adapters for m in ref.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


def test_load_adapter_under_an_existing_name_loads_the_new_weights_as_peft(tmp_path):
    """minipeft refused the name ("already exists"); PEFT loads the file's weights into that adapter, its
    trainability kept. A file whose config differs is refused: PEFT keeps the adapter's config and would
    apply the new weights at the old scaling (lora_alpha 4 here), silently."""
    cfg = dict(r=2, target_modules=["q_proj", "v_proj"])
    ours, ref = both(("default", cfg))
    ours.save_pretrained(tmp_path / "old")
    new, _ = both(("default", cfg))  # other random weights
    new.save_pretrained(tmp_path / "new")
    for model in (ours, ref):
        model.load_adapter(str(tmp_path / "old"), "x", is_trainable=True)
        model.load_adapter(str(tmp_path / "new"), "x")  # is_trainable=False
        model.set_adapter("x")
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), new(IDS), atol=0, rtol=0)
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4}))
    with pytest.raises(ValueError, match=r"adapter 'x' exists with another config: lora_alpha 8 here, 4 in the file"):
        ours.load_adapter(tmp_path / "old", "x")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), new(IDS), atol=0, rtol=0)
    ours.merge_adapter()  # new weights under a merged ΔW: unmerging would subtract the wrong one
    with pytest.raises(ValueError, match=r"adapter 'x' is merged; unmerge_adapter\(\) before loading weights"):
        ours.load_adapter(tmp_path / "new", "x")

"""LoRA on embed_tokens against Hugging Face `peft` (test-only): logits, gradients, files both ways,
merged weights and parameter counts; and its maths here (no-op at init, no dropout, QLoRA, tied merge)."""
import contextlib
import io
import warnings

import pytest
import torch
from torch import nn

from minipeft import ModelConfig, PrefixTuningConfig, Transformer, load_pretrained
from minipeft.linear4bit import quantize_model
from minipeft.lora import LoraConfig, LoraLinear
from minipeft.lora_embedding import LoraEmbedding
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.tuner_layer import TunerLayer
from conftest import same_random_adapter, tiny_model, to_hf
from test_lora import IDS, trained
from test_qlora import dequantized_twin

import peft
from safetensors.torch import load_file

CASES = {
    "embed_tokens": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
    "embed_tokens-q-v-rslora": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj"],
                                    use_rslora=True),
}
FAMILIES = ["llama-gqa", "qwen2"]  # qwen2: tie_word_embeddings, lm_head is embed_tokens' weight
EMBED = "base_model.model.model.embed_tokens"  # PEFT's path of the table in files and parameter names


def peft_model(cfg: dict, family: str):
    """PEFT's model for `cfg`; on a tied model PEFT warns that merging is a problem (see the tied test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(to_hf(tiny_model(family)), peft.LoraConfig(task_type="CAUSAL_LM", **cfg))


def pair(cfg: dict, family: str = "llama-gqa"):
    """minipeft's and PEFT's models holding the same random adapter weights (A != 0: the adapter matters)."""
    ours = get_peft_model(tiny_model(family), LoraConfig(**cfg))
    ref = peft_model(cfg, family)
    torch.manual_seed(0)
    same_random_adapter(ours, ref, std=0.1)
    return ours.eval(), ref.eval()


def printed(model) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue()


def test_shapes_init_and_a_no_op_at_init():
    ours = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    layer = ours.base_model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding) and layer.scaling["default"] == 2
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert A.shape == (4, 131) and B.shape == (64, 4) and A.dtype == B.dtype == torch.float32
    assert torch.equal(A, torch.zeros_like(A))  # the opposite of Linear LoRA: A zeros, B N(0, 1)
    assert abs(B.std().item() - 1) < 0.2
    assert torch.equal(ours(IDS), tiny_model()(IDS))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_same_logits_and_gradients_as_peft(case, family):
    ours, ref = pair(CASES[case], family)
    logits, ref_logits = ours.train()(IDS), ref.train()(IDS).logits
    assert (logits - tiny_model(family)(IDS)).abs().max() > 1e-2  # the adapter matters
    # float32, the same ops in the same order: observed ~1e-7.
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    logits.logsumexp(-1).mean().backward()
    ref_logits.logsumexp(-1).mean().backward()
    ref_params = dict(ref.named_parameters())
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert any(".lora_embedding_A." in n for n in grads) and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        # float32 backward through the same graph: observed <= 2e-8 absolute.
        torch.testing.assert_close(grad, ref_params[name.replace("base_model.", "base_model.model.", 1)].grad,
                                   atol=1e-6, rtol=1e-5, msg=name)


def test_lora_dropout_never_touches_the_embedding_branch_as_in_peft():
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["embed_tokens"])
    ours, ref = pair(cfg)
    expected = ours(IDS)
    torch.manual_seed(0)
    assert torch.equal(ours.train()(IDS), expected)
    torch.testing.assert_close(ref.train()(IDS).logits, expected, atol=1e-5, rtol=0)


def test_a_bfloat16_table_with_float32_adapters_equals_peft_bit_for_bit():
    """As for Linear LoRA: float32 branch added to the bfloat16 lookup, one cast of the sum."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    ours = get_peft_model(tiny_model().to(torch.bfloat16), LoraConfig(**cfg)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(to_hf(tiny_model()).to(torch.bfloat16), peft.LoraConfig(**cfg)).eval()
    layer, ref_layer = ours.base_model.model.embed_tokens, ref.base_model.model.model.embed_tokens
    assert ref_layer.lora_embedding_A["default"].dtype == layer.lora_embedding_A["default"].dtype == torch.float32
    with torch.no_grad():
        for ab in ("lora_embedding_A", "lora_embedding_B"):
            getattr(layer, ab)["default"].normal_(std=0.3)
            getattr(ref_layer, ab)["default"].copy_(getattr(layer, ab)["default"])
        assert layer(IDS).dtype == torch.bfloat16
        assert torch.equal(layer(IDS), ref_layer(IDS))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_print_trainable_parameters_equals_peft(case, family):
    ours, ref = pair(CASES[case], family)
    assert printed(ours) == printed(ref)


def test_count_on_llama_2_7b_built_on_meta():
    """r · (vocab + d) more than the outline's q/v line: 8 · (32000 + 4096) = 288,768."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("llama-2-7b"))
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "embed_tokens"])
    assert printed(get_peft_model(model, cfg)) == \
        "trainable params: 4,483,072 || all params: 6,742,898,688 || trainable%: 0.0665\n"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_minipeft_adapter_loads_in_peft(case, family, tmp_path):
    """minipeft does not write embed_tokens.base_layer.weight (the unchanged table) as PEFT does: PEFT
    loads the file all the same, even with strict_adapter_check="error", the table left as it is."""
    ours, _ = trained(LoraConfig(**CASES[case]), family=family)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(to_hf(tiny_model(family)), tmp_path, strict_adapter_check="error").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_minipeft(case, family, tmp_path):
    """PEFT (save_embedding_layers="auto") writes the table itself too, embed_tokens.base_layer.weight,
    and loads it into the base; changed here so that a loader ignoring it would fail."""
    _, ref = pair(CASES[case], family)
    with torch.no_grad():
        ref.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path)
    assert f"{EMBED}.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


def test_file_keys_are_peft_keys(tmp_path):
    """The same keys, bare (no ".weight"); minipeft does not write the frozen table, which PEFT adds."""
    ours, ref = pair(CASES["embed_tokens-q-v-rslora"])
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path / "ref")
    keys, ref_keys = (set(load_file(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "ref"))
    assert {f"{EMBED}.lora_embedding_A", f"{EMBED}.lora_embedding_B"} <= keys
    assert keys == ref_keys - {f"{EMBED}.base_layer.weight"}


def test_merge_and_unload_equals_peft_merged_weights():
    ours, ref = pair(CASES["embed_tokens-q-v-rslora"])
    expected = ours(IDS)
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    assert not any(isinstance(m, TunerLayer) for m in merged.modules())
    assert type(merged.model.embed_tokens) is nn.Embedding
    ref_state = ref_merged.state_dict()
    for name, tensor in merged.state_dict().items():
        # both W + s (B A)ᵀ in float32 from the same factors: observed 0.
        torch.testing.assert_close(tensor, ref_state[name], atol=1e-7, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=0)


def test_merge_is_reversible_and_disable_adapter_gives_the_base():
    ours, _ = pair(CASES["embed_tokens"])
    layer = ours.base_model.model.embed_tokens
    W0, unmerged = layer.base_layer.weight.clone(), ours(IDS)
    delta = 2 * (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T
    ours.merge_adapter()
    ours.merge_adapter()  # twice == once
    torch.testing.assert_close(layer.base_layer.weight, W0 + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(IDS), unmerged, atol=1e-5, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(IDS), tiny_model()(IDS), atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, W0, atol=1e-6, rtol=0)


def test_tied_embeddings_merge_into_their_own_copy_where_peft_moves_lm_head_too(tmp_path):
    """qwen2's lm_head is embed_tokens' weight. PEFT merges ΔW into that shared tensor: lm_head moves
    too and its merged model no longer computes what base + adapter did. minipeft refuses merge_adapter
    and merge_and_unload unties them: embed_tokens as PEFT's, lm_head the original."""
    ours, ref = pair(CASES["embed_tokens"], "qwen2")
    table = ours.base_model.model.embed_tokens.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected, ref_expected = ours(IDS), ref(IDS).logits
    with pytest.raises(ValueError, match=r"\['model.embed_tokens'\] share their weight with another module"):
        ours.merge_adapter()
    merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that this merge is a problem
        ref_merged = ref.merge_and_unload()
    assert not merged.config.tie_word_embeddings and ref_merged.config.tie_word_embeddings
    torch.testing.assert_close(merged.model.embed_tokens.weight, ref_merged.model.embed_tokens.weight,
                               atol=1e-7, rtol=0)
    assert torch.equal(merged.lm_head.weight, table) and not torch.equal(ref_merged.lm_head.weight, table)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=0)
        assert (ref_merged(IDS).logits - ref_expected).abs().max() > 1e-3  # PEFT's merge changed the model
        merged.save_pretrained(tmp_path)  # both matrices written, read back untied
        torch.testing.assert_close(load_pretrained(tmp_path)(IDS), expected, atol=1e-5, rtol=0)


def test_all_linear_excludes_the_embedding_as_peft_and_a_regex_can_name_it():
    def targets(target_modules):
        ours = get_peft_model(tiny_model(), LoraConfig(target_modules=target_modules))
        return sorted(n for n, m in ours.base_model.named_modules() if isinstance(m, TunerLayer))

    all_linear = targets("all-linear")
    assert "model.embed_tokens" not in all_linear
    assert all_linear == sorted(peft_model(dict(target_modules="all-linear"), "llama-gqa").targeted_module_names)
    assert targets(r"model\.(embed_tokens|layers\.0\.self_attn\.q_proj)") == [
        "model.embed_tokens", "model.layers.0.self_attn.q_proj"]


def test_only_adapters_train_and_the_table_stays_bit_identical():
    ours, before = trained(LoraConfig(**CASES["embed_tokens-q-v-rslora"]), steps=2)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert torch.equal(ours.base_model.model.embed_tokens.base_layer.weight, before["model.embed_tokens.weight"])
    assert ours.base_model.model.embed_tokens.lora_embedding_A["default"].abs().max() > 0  # A moved from 0


def test_two_adapters_switch_and_delete(tmp_path):
    """A ParameterDict layer takes part in named adapters as a ModuleDict one does."""
    first, _ = trained(LoraConfig(r=4, target_modules=["embed_tokens"]))
    first.save_pretrained(tmp_path / "e")
    second, _ = trained(LoraConfig(r=2, target_modules=["q_proj"]), steps=2)
    second.save_pretrained(tmp_path / "q")
    served = PeftModel.from_pretrained(tiny_model(), tmp_path / "e", adapter_name="e")
    served.load_adapter(tmp_path / "q", adapter_name="q", is_trainable=True)
    served.set_adapter("q")
    torch.testing.assert_close(served(IDS), second(IDS), atol=1e-6, rtol=0)
    assert all(".lora_A.q" in n or ".lora_B.q" in n for n, p in served.named_parameters() if p.requires_grad)
    served.set_adapter("e")
    torch.testing.assert_close(served(IDS), first(IDS), atol=1e-6, rtol=0)
    served.delete_adapter("e")
    assert type(served.base_model.model.embed_tokens) is nn.Embedding


def test_prefix_tuning_beside_an_embedding_adapter_runs():
    """Prefix tuning reads embed_tokens.weight (for its dtype): the wrapper gives the frozen table."""
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["embed_tokens"]))
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=3))
    model.set_adapter("prefix")
    assert model.base_model.model.embed_tokens.weight is model.base_model.model.embed_tokens.base_layer.weight
    assert model(IDS).shape == (*IDS.shape, 131)


def test_qlora_embedding_is_never_quantized_and_equals_lora_over_dequantized_weights():
    cfg = dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj"], init_lora_weights=False)
    q = tiny_model()
    quantize_model(q)
    twin = dequantized_twin(q)
    torch.manual_seed(1)
    qlora = get_peft_model(q, LoraConfig(**cfg)).eval()
    torch.manual_seed(1)
    lora = get_peft_model(twin, LoraConfig(**cfg)).eval()
    assert type(qlora.base_model.model.embed_tokens.base_layer) is nn.Embedding
    assert isinstance(qlora.base_model.model.layers[0].self_attn.q_proj, LoraLinear)
    with torch.no_grad():
        expected = lora(IDS)
        torch.testing.assert_close(qlora(IDS), expected, atol=1e-5, rtol=0)  # as test_qlora: ~1e-7
        torch.testing.assert_close(qlora.merge_and_unload()(IDS), expected, atol=1e-5, rtol=0)


def test_a_module_neither_linear_nor_embedding_is_refused():
    with pytest.raises(ValueError, match=r"not Linear or Embedding layers: \['model.norm'\]"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["norm"]))

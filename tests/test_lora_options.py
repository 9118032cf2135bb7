"""peft.LoraConfig's fields (and the prompt-learning configs'), field by field against peft 0.22: each is
implemented as peft, refused naming field and value, or accepted because it changes nothing on LLaMA."""
import json
import re
import warnings

import pytest
import torch

from minipeft.lora import LoraConfig
from minipeft.peft_config import PeftConfig
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
from conftest import same_random_adapter, tiny_model, to_hf
from test_lora import IDS

import peft
from safetensors.torch import load_file

PATTERNS = {
    # keys end-anchored after a dot, the first that matches wins (PEFT's get_pattern_key)
    "q-and-layer-1-v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                            alpha_pattern={"v_proj": 3}),
    "rslora-embedding": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["embed_tokens", "down_proj"],
                             rank_pattern={"embed_tokens": 2}, alpha_pattern={r"layers\.0\.mlp\.down_proj": 16}),
}


def _pair(fields):
    ours = get_peft_model(tiny_model("llama-gqa"), LoraConfig(**fields))
    ref = peft.get_peft_model(to_hf(tiny_model("llama-gqa")), peft.LoraConfig(task_type="CAUSAL_LM", **fields))
    return ours, ref


@pytest.mark.parametrize("case", sorted(PATTERNS))
def test_rank_and_alpha_pattern_equal_peft(case, tmp_path):
    """rank_pattern/alpha_pattern were refused: per-module r and lora_alpha, with peft's shapes, scalings,
    logits, gradients and files (both ways)."""
    ours, ref = _pair(PATTERNS[case])
    shapes = {n: p.shape for n, p in ours.named_parameters() if p.requires_grad}
    assert shapes == {n.replace("base_model.model.", "base_model.", 1): p.shape
                      for n, p in ref.named_parameters() if p.requires_grad}
    same_random_adapter(ours, ref, std=0.05)
    ours.eval(), ref.eval()
    ours(IDS).sum().backward()
    ref(IDS).logits.sum().backward()
    torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n.replace("base_model.", "base_model.model.", 1)],
                                       atol=1e-5, rtol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    ours_file, ref_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "ref"))
    # PEFT also saves a LoRA-targeted embedding's base weight (for a resized vocabulary; peft_files loads it)
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in ref_file.items()
                                                          if not k.endswith("embed_tokens.base_layer.weight")}
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "ref")]
    assert [(s["rank_pattern"], s["alpha_pattern"]) for s in saved] == [(PATTERNS[case]["rank_pattern"],
                                                                         PATTERNS[case]["alpha_pattern"])] * 2
    in_peft = peft.PeftModel.from_pretrained(to_hf(tiny_model("llama-gqa")), tmp_path / "ours").eval()
    in_ours = PeftModel.from_pretrained(tiny_model("llama-gqa"), tmp_path / "ref")
    with torch.no_grad():
        torch.testing.assert_close(in_peft(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(in_ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)


EXCLUDES = {"suffix": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"]),
            "regex": dict(target_modules="all-linear", exclude_modules=r".*mlp\..*"),
            "names-only": dict(target_modules=r".*\.(q|k)_proj", exclude_modules=["k_proj"])}


@pytest.mark.parametrize("case", sorted(EXCLUDES))
def test_exclude_modules_equal_peft(case, tmp_path):
    """exclude_modules was refused: the modules taken out of the selection, as peft takes them, logits and
    files both ways."""
    ours, ref = _pair(dict(r=4, lora_alpha=8, **EXCLUDES[case]))
    wrapped = sorted(n.replace("base_model.", "", 1) for n, m in ours.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == sorted(n.replace("base_model.model.", "", 1) for n, m in ref.named_modules()
                             if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)
                             and "default" in m.lora_A)
    same_random_adapter(ours, ref, std=0.05)
    ours.eval(), ref.eval()
    ours.save_pretrained(tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(to_hf(tiny_model("llama-gqa")), tmp_path / "ours").eval()
    ref.save_pretrained(tmp_path / "ref")
    in_ours = PeftModel.from_pretrained(tiny_model("llama-gqa"), tmp_path / "ref")
    with torch.no_grad():
        for model in (ours, in_ours):
            torch.testing.assert_close(model(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(in_peft(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)


def test_exclude_modules_that_exclude_all_or_nothing_are_told_as_peft():
    with pytest.raises(ValueError, match=r"exclude_modules=\['q_proj'\] and modules_to_save=None exclude every"):
        get_peft_model(tiny_model("llama-gqa"), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="no modules were excluded"):
        get_peft_model(tiny_model("llama-gqa"), LoraConfig(target_modules=["q_proj"], exclude_modules=["nothing"]))


def test_modules_to_save_are_no_lora_targets_as_in_peft(tmp_path):
    """LoRA on q_proj and lm_head with lm_head in modules_to_save: peft trains a copy of lm_head and LoRA on
    q_proj only; minipeft refused ("lm_head is already wrapped")."""
    ours, ref = _pair(dict(r=4, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]))
    wrapped = sorted(n.replace("base_model.", "", 1) for n, m in ours.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert sorted(n.replace("base_model.model.", "", 1) for n, m in ref.named_modules()
                  if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and "default" in m.lora_A) == wrapped
    same_random_adapter(ours, ref, std=0.05)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\] exclude every module"):
        get_peft_model(tiny_model("llama-gqa"), LoraConfig(target_modules=["lm_head"], modules_to_save=["lm_head"]))


def test_a_bad_rank_pattern_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be a positive integer, got 0"):
        LoraConfig(rank_pattern={"q_proj": 0})


# PEFT fields minipeft does not implement, each with a value that changes PEFT's model.
REFUSED = {
    "use_dora": True, "lora_bias": True, "layer_replication": [[0, 1]],
    "trainable_token_indices": [0, 1], "target_parameters": ["mlp.experts.gate_up_proj"],
    "alora_invocation_tokens": [1, 2], "use_bdlora": True, "megatron_config": {"tensor_model_parallel_size": 1},
    "corda_config": {"corda_method": "kpm"},
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_fields_minipeft_lacks_are_refused_in_python_and_in_files(field, tmp_path):
    """LoraConfig(use_dora=True) was a TypeError naming no value, and LoraConfig(use_dora=False), PEFT's
    default, a TypeError too; a file said which field. Both paths now name field and value."""
    value = REFUSED[field]
    message = re.escape(f"fields not supported by minipeft: {field}={value!r}")
    with pytest.raises(ValueError, match="LoraConfig: " + message):
        LoraConfig(target_modules=["q_proj"], **{field: value})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", field: value}))
    with pytest.raises(ValueError, match=rf"adapter_config.json: LoraConfig: {message}"):
        PeftConfig.load(tmp_path)


@pytest.mark.parametrize("make", [
    lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], use_rslora=True),
    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
], ids=["lora", "prefix", "prompt"])
def test_every_field_of_a_peft_config_is_accepted_at_its_value_in_python(make, tmp_path):
    """A config as PEFT writes it, every field at its default, passes as keywords (as PEFT's code does)."""
    make().save_pretrained(str(tmp_path))
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    from_python = type(PeftConfig.load(tmp_path))(**{k: v for k, v in fields.items() if k != "peft_type"})
    assert from_python == PeftConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**fields, "inference_mode": True}))
    assert not PeftConfig.load(tmp_path).inference_mode  # a file's is not used: from_pretrained decides


def test_fields_with_no_effect_on_llama_are_accepted_as_peft():
    """fan_in_fan_out (GPT-2's Conv1D: PEFT warns and sets False on nn.Linear), use_qalora and
    qalora_group_size (GPTQ layers only), runtime_config (GPU offload), revision, loftq_config={}:
    the same model as PEFT's, with PEFT's warning for fan_in_fan_out."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_qalora=True, qalora_group_size=4,
                  revision="v1", fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True .* Setting fan_in_fan_out to False"):
        ours = get_peft_model(tiny_model(), LoraConfig(runtime_config=None, **fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(task_type="CAUSAL_LM", **fields))
    same_random_adapter(ours, ref, std=0.05)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), ref.eval()(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ours_config, ref_config", [
    (LoraConfig(r=4, inference_mode=True), peft.LoraConfig(task_type="CAUSAL_LM", r=4, inference_mode=True)),
    (PrefixTuningConfig(num_virtual_tokens=3, inference_mode=True),
     peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, inference_mode=True)),
], ids=["lora", "prefix"])
def test_inference_mode_builds_a_frozen_adapter_as_peft(ours_config, ref_config):
    """inference_mode=True was a TypeError (LoraConfig) or ignored: PEFT builds the adapter frozen."""
    ours = get_peft_model(tiny_model(), ours_config)
    ref = peft.get_peft_model(to_hf(tiny_model()), ref_config)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 0


def test_task_type_as_peft():
    """Any PEFT task type gives PEFT the causal LM's LoRA logits on a LlamaForCausalLM, so it is accepted; a
    misspelt one is refused as PEFT refuses it (it was accepted). Prompt learning refuses None (PEFT's forward
    fails) and SEQ_2_SEQ_LM (an encoder-decoder's two tables)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    ours = get_peft_model(tiny_model(), LoraConfig(task_type="SEQ_CLS", **fields))
    ref = peft.get_peft_model(to_hf(tiny_model()), peft.LoraConfig(task_type="SEQ_CLS", **fields))
    same_random_adapter(ours, ref, std=0.05)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), ref.eval()(IDS).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Invalid task type: 'CASUAL_LM'"):
        peft.LoraConfig(task_type="CASUAL_LM")
    with pytest.raises(ValueError, match="LoraConfig: task_type must be one of .* got 'CASUAL_LM'"):
        LoraConfig(task_type="CASUAL_LM")
    for task_type in (None, "SEQ_2_SEQ_LM"):
        with pytest.raises(ValueError, match=rf"PromptTuningConfig: task_type={task_type!r} is not supported"):
            PromptTuningConfig(num_virtual_tokens=2, task_type=task_type)
    with pytest.raises(ValueError, match=r"num_transformer_submodules=2"):
        PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2)


def user_warnings(make):
    """make()'s result and the (category, message) of each UserWarning it raised (torch's DeprecationWarnings not)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make()
    return result, [(w.category, str(w.message)) for w in caught if issubclass(w.category, UserWarning)]


def test_loftq_config_without_loftq_init_is_warned_of_and_dropped_as_peft():
    """A loftq_config without init_lora_weights="loftq" was refused: peft warns at construction and sets it {},
    an unused value. init_lora_weights="loftq" itself stays refused (LoftQ rewrites the base weights)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj"], loftq_config={"loftq_bits": 4})
    ours, ours_warned = user_warnings(lambda: LoraConfig(**fields))
    ref, ref_warned = user_warnings(lambda: peft.LoraConfig(task_type="CAUSAL_LM", **fields))
    assert ours_warned == ref_warned == [(UserWarning, "`loftq_config` specified but will be ignored when "
                                                       "`init_lora_weights` is not 'loftq'.")]
    assert ref.loftq_config == {} and "loftq_config" not in ours.to_dict()  # as peft's default, {}
    assert ours == LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="init_lora_weights must be one of"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})


@pytest.mark.parametrize("tied, targets", [(False, ["q_proj", "lm_head"]), (True, ["q_proj", "v_proj"])],
                         ids=["untied", "tied-without-embeddings"])
def test_ensure_weight_tying_where_nothing_is_tied_is_warned_of_as_peft(tied, targets, tmp_path):
    """ensure_weight_tying=True was refused for any model: peft warns at get_peft_model that there is nothing to
    tie and builds the same model, keeping the value (saved). Same warning, logits and file here."""
    fields = dict(r=4, lora_alpha=8, target_modules=targets, ensure_weight_tying=True)
    ours, ours_warned = user_warnings(lambda: get_peft_model(tiny_model(tie_word_embeddings=tied),
                                                             LoraConfig(**fields)))
    ref, ref_warned = user_warnings(lambda: peft.get_peft_model(to_hf(tiny_model(tie_word_embeddings=tied)),
                                                                peft.LoraConfig(task_type="CAUSAL_LM", **fields)))
    assert ours_warned == ref_warned and len(ours_warned) == 1 and "ensure_weight_tying" in ours_warned[0][1]
    same_random_adapter(ours, ref, std=0.05)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), ref.eval()(IDS).logits, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    _, reloaded = user_warnings(lambda: PeftModel.from_pretrained(tiny_model(tie_word_embeddings=tied), tmp_path))
    assert reloaded == ref_warned  # peft checks again when it loads


def test_tied_embeddings_in_the_adapter_as_peft():
    """On tied embeddings, LoRA on lm_head: peft warns unless ensure_weight_tying, and with it adds LoRA on
    embed_tokens as well (a tied twin), which minipeft lacks: refused, naming the field."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    ours, ours_warned = user_warnings(lambda: get_peft_model(tiny_model(tie_word_embeddings=True),
                                                             LoraConfig(**fields)))
    ref, ref_warned = user_warnings(lambda: peft.get_peft_model(to_hf(tiny_model(tie_word_embeddings=True)),
                                                                peft.LoraConfig(task_type="CAUSAL_LM", **fields)))
    assert ours_warned == ref_warned and "`ensure_weight_tying` is not set to True" in ours_warned[0][1]
    ref = peft.get_peft_model(to_hf(tiny_model(tie_word_embeddings=True)),
                              peft.LoraConfig(task_type="CAUSAL_LM", ensure_weight_tying=True, **fields))
    assert any("embed_tokens.lora_embedding_A" in n for n, _ in ref.named_parameters())
    for more in (dict(target_modules=["q_proj", "lm_head"]), dict(target_modules="q_proj|lm_head"),
                 dict(target_modules=["q_proj"], modules_to_save=["lm_head"])):
        with pytest.raises(ValueError, match=r"LoraConfig: ensure_weight_tying=True with .* tied embeddings"):
            get_peft_model(tiny_model(tie_word_embeddings=True), LoraConfig(ensure_weight_tying=True, **more))

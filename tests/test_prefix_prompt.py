"""Prefix and prompt tuning against Hugging Face `peft` (test-only): logits, files both ways, generation, counts."""
import json

import pytest
import torch
from safetensors import safe_open

from minipeft import KVCache, ModelConfig, Transformer
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
from conftest import tiny_config, tiny_model, to_hf
from test_lora import IDS, trained
from test_model_parity import padded_batch

import peft
import transformers
# peft 0.21 still calls transformers 5 by deprecated names; the noise is theirs.
pytestmark = pytest.mark.filterwarnings("ignore:.*(past_key_values|is_gradient_checkpointing).*:FutureWarning")

P = 5  # virtual tokens: odd, and as many as Mistral's sliding window (5 keys)
CASES = {  # name -> (our config class, peft's, shared kwargs)
    "prefix": (PrefixTuningConfig, "PrefixTuningConfig", dict(num_virtual_tokens=P)),
    "prefix-projection": (PrefixTuningConfig, "PrefixTuningConfig",
                          dict(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24)),
    "prompt": (PromptTuningConfig, "PromptTuningConfig", dict(num_virtual_tokens=P)),
}


def ours_config(case):
    cls, _, kw = CASES[case]
    return cls(**kw)


def peft_model_for(case, family):
    _, name, kw = CASES[case]
    return peft.get_peft_model(to_hf(tiny_model(family)), getattr(peft, name)(task_type="CAUSAL_LM", **kw))


def peft_logits(ref, case, ids, mask):
    """PEFT's logits of the real tokens, with positions that count real tokens as ours do.

    Prefix tuning: PEFT adds P to the position_ids it is given. Prompt tuning: PEFT drops
    position_ids, and the model then numbers all P + T inputs 0.. whatever the padding; for
    left-padded rows, ours are given the same explicit numbering (see `our_logits`).
    """
    with torch.no_grad():
        if case.startswith("prefix"):
            return ref(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        return ref(ids, attention_mask=mask).logits[:, P:]  # PEFT returns the virtual positions too


def our_logits(ours, case, ids, mask):
    if case == "prompt" and not mask[:, 0].all():  # left padding: PEFT's numbering, see peft_logits
        return ours(ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    return ours(ids, attention_mask=mask)


def assert_same_real_logits(ours, ref, case, ids, mask):
    real = mask.bool()  # outputs at pad positions are meaningless in both
    # float32; the same operations up to SDPA vs eager softmax: observed ~3e-7.
    torch.testing.assert_close(our_logits(ours, case, ids, mask)[real], peft_logits(ref, case, ids, mask)[real],
                               atol=1e-5, rtol=0)


def randomize(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)


@pytest.mark.parametrize("family", ["llama-mha", "mistral"])  # GQA families: the next test; logits: all four below
@pytest.mark.parametrize("case", sorted(CASES))
def test_minipeft_files_load_in_peft(case, family, tmp_path):
    ours, _ = trained(ours_config(case), family=family)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(to_hf(tiny_model(family)), tmp_path).eval()
    for side in ("left", "right"):
        ids, mask = padded_batch(T=12, side=side)
        assert_same_real_logits(ours, ref, case, ids, mask)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_files_load_in_minipeft(case, family, tmp_path):
    ref = peft_model_for(case, family)
    randomize(ref.prompt_encoder)
    ref.eval().save_pretrained(tmp_path)  # a projection is saved folded: its output for every virtual token
    ours = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    ids, mask = padded_batch(T=12, side="right")
    assert_same_real_logits(ours, ref, case, ids, mask)  # ref still runs its MLP: folding changes nothing
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_same_logits_and_parameter_counts(case, family):
    ours = get_peft_model(tiny_model(family), ours_config(case))
    ref = peft_model_for(case, family)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    randomize(ours.prompt_encoder)
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())  # same names: embedding, transform.*
    ours.eval(), ref.eval()
    ids, mask = padded_batch(T=12)
    assert_same_real_logits(ours, ref, case, ids, mask)


def test_parameter_count_formulas():
    cfg = tiny_config("llama-gqa")  # d = 64, L = 2, kv width = 2 heads x 8 = 16
    d, L, w, h = 64, 2, 16, 24
    counts = {case: get_peft_model(tiny_model(), ours_config(case)).get_nb_trainable_parameters()[0]
              for case in CASES}
    assert cfg.num_key_value_heads * cfg.head_dim == w
    assert counts["prefix"] == P * L * 2 * w
    assert counts["prefix-projection"] == P * w + (w * h + h) + (h * L * 2 * w + L * 2 * w)  # E, Linear, Linear
    assert counts["prompt"] == P * d


@pytest.mark.parametrize("config,expected", [
    (PrefixTuningConfig(num_virtual_tokens=20),
     "trainable params: 5,242,880 || all params: 6,743,658,496 || trainable%: 0.0777"),
    (PromptTuningConfig(num_virtual_tokens=20),
     "trainable params: 81,920 || all params: 6,738,497,536 || trainable%: 0.0012"),
])
def test_llama_2_7b_counts_equal_peft(config, expected, capsys):
    mc = ModelConfig.from_preset("llama-2-7b")
    with torch.device("meta"):
        ours = get_peft_model(Transformer(mc), config)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**mc.to_hf_config()))
    ref = peft.get_peft_model(hf, getattr(peft, type(config).__name__)(task_type="CAUSAL_LM", num_virtual_tokens=20))
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    formula = 20 * 32 * 2 * 4096 if config.peft_type == "PREFIX_TUNING" else 20 * 4096
    assert ours.get_nb_trainable_parameters()[0] == formula
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected + "\n"


def peft_greedy(ref, case, ids, mask, n):
    """Greedy decoding by PEFT's forward on the whole sequence each step (see peft_logits).

    Uncached, so that this test does not rest on PEFT's generate (in peft 0.21.2 it lost the cache under
    transformers 5; 0.22's works, and tests/test_prompt_learning_fuzz.py compares with it directly).
    """
    for _ in range(n):
        nxt = peft_logits(ref, case, ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat((ids, nxt), dim=1), torch.cat((mask, torch.ones_like(nxt)), dim=1)
    return ids


def test_prefix_greedy_generation_matches_peft_left_padded(family):
    ours = get_peft_model(tiny_model(family), ours_config("prefix")).eval()
    randomize(ours.prompt_encoder, std=0.3)  # strong enough to change the output, not to dominate it
    ref = peft_model_for("prefix", family)
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    ids, mask = padded_batch(T=11)  # rows with 0, 4 and 9 pads
    ids = ids.masked_fill(mask == 0, 0)
    cached = ours.generate(ids, 10, attention_mask=mask)
    assert torch.equal(cached, ours.generate(ids, 10, attention_mask=mask, use_cache=False))
    assert torch.equal(cached, peft_greedy(ref.eval(), "prefix", ids, mask, 10))
    real = mask.bool()
    assert (ours(ids, attention_mask=mask) - tiny_model(family)(ids, attention_mask=mask))[real].abs().max() > 1e-2


def test_prompt_generation_with_and_without_cache_and_against_peft():
    ours, _ = trained(ours_config("prompt"), family="llama-mha")
    ids, mask = padded_batch(T=11)
    ids = ids.masked_fill(mask == 0, 0)
    cached = ours.generate(ids, 10, attention_mask=mask)
    assert torch.equal(cached, ours.generate(ids, 10, attention_mask=mask, use_cache=False))
    ref = peft_model_for("prompt", "llama-mha")
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    # Unpadded rows: PEFT's prompt-tuning forward numbers positions ignoring padding (see peft_logits).
    ids = ids[:1].expand(2, -1).clone()
    ids[1, -1] = 7
    assert torch.equal(ours.generate(ids, 10), peft_greedy(ref.eval(), "prompt", ids, torch.ones_like(ids), 10))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_steps_equal_one_full_forward(case):
    """The virtual tokens enter the cache once; later steps must not add them again."""
    ours, _ = trained(ours_config(case), family="mistral")
    ids, mask = padded_batch(T=10)
    full = ours(ids, attention_mask=mask)
    cache = KVCache(2)
    steps = [ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
    for t in range(6, 10):
        steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    assert cache.length == P + 10
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=0)  # fp32 reordering


@pytest.mark.parametrize("case", sorted(CASES))
def test_inputs_embeds_equal_input_ids(case):
    ours, _ = trained(ours_config(case))
    ids, mask = padded_batch(T=8, side="right")
    embeds = ours.base_model.model.embed_tokens(ids)
    torch.testing.assert_close(ours(inputs_embeds=embeds, attention_mask=mask), ours(ids, attention_mask=mask),
                               atol=0, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_row_of_position_ids_serves_every_row(case):
    """position_ids (1, T), which the model broadcasts over the batch: prompt tuning put its (B, P)
    virtual positions in front of them and crashed on the shapes."""
    ours, _ = trained(ours_config(case))
    ids = IDS[:, :8]
    shared = torch.arange(3, 11)[None]
    torch.testing.assert_close(ours(ids, position_ids=shared), ours(ids, position_ids=shared.expand_as(ids)),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"position_ids must be \(batch, T\).*arange\(T\)\[None\]"):
        ours(ids, position_ids=shared[0])  # 1-D: the model's own message, not a torch.cat shape error


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_the_prompt_encoder_trains(case):
    ours, before = trained(ours_config(case), steps=2)
    encoder = {"prompt_encoder.default." + n for n, _ in ours.prompt_encoder["default"].named_parameters()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == encoder
    ours(IDS).logsumexp(-1).mean().backward()
    assert {n for n, p in ours.named_parameters() if p.grad is not None} == encoder
    for name, p in ours.base_model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("init_weights", [None, "zero"])
def test_prefix_is_not_a_no_op_at_init_but_disabling_gives_the_base(init_weights):
    base = tiny_model()(IDS)
    ours = get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=P, init_weights=init_weights))
    if init_weights == "zero":
        assert not ours.prompt_encoder["default"].embedding.weight.any()
    # Zero keys score 0 and still take softmax weight: the real tokens' attention is scaled down.
    assert (ours(IDS) - base).abs().max() > 1e-3
    with ours.disable_adapter():
        torch.testing.assert_close(ours(IDS), base, atol=0, rtol=0)


def test_prefix_projection_is_folded_when_saved(tmp_path):
    ours, _ = trained(ours_config("prefix-projection"))
    ours.save_pretrained(tmp_path)
    enc = ours.prompt_encoder["default"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        saved = f.get_tensor("prompt_embeddings")
    torch.testing.assert_close(saved, enc.transform(enc.embedding.weight).detach(), atol=0, rtol=0)
    resumed = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert resumed.prompt_encoder["default"].transform is None
    assert resumed.get_nb_trainable_parameters()[0] == P * 2 * 2 * 16  # the table itself now trains
    torch.testing.assert_close(resumed(IDS), ours(IDS), atol=1e-6, rtol=0)  # fp32: MLP vs its stored output


def test_bf16_model_keeps_float32_prompt_parameters():
    for case in ("prefix", "prompt"):
        ours = get_peft_model(tiny_model().to(torch.bfloat16), ours_config(case)).train()
        out = ours(IDS)
        assert out.dtype == torch.bfloat16 and out.shape == (*IDS.shape, 131)
        out.float().logsumexp(-1).mean().backward()
        weight = ours.prompt_encoder["default"].embedding.weight
        assert weight.dtype == torch.float32 and weight.grad.abs().sum() > 0


def test_prompt_tuning_inits_match_peft(tmp_path):
    from conftest import train_tiny

    tok_dir = tmp_path / "tok"
    train_tiny(tok_dir)  # 384 pieces: the model needs as many embeddings
    text = "the quick brown fox"
    for n in (3, 23):  # trims the text's 20 ids, repeats them
        kw = dict(num_virtual_tokens=n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                  tokenizer_name_or_path=str(tok_dir))
        ours = get_peft_model(tiny_model(vocab_size=384), PromptTuningConfig(**kw))
        ref_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", **kw)
        ref = peft.get_peft_model(to_hf(tiny_model(vocab_size=384)), ref_config)
        torch.testing.assert_close(ours.prompt_encoder["default"].embedding.weight,
                                   ref.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    ours.save_pretrained(tmp_path / "adapter")
    (tok_dir / "tokenizer.model").unlink()  # loading for inference needs no tokenizer: the file replaces the init
    loaded = PeftModel.from_pretrained(tiny_model(vocab_size=384), tmp_path / "adapter")
    torch.testing.assert_close(loaded(IDS), ours(IDS), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="tokenizer.model: missing"):
        PeftModel.from_pretrained(tiny_model(vocab_size=384), tmp_path / "adapter", is_trainable=True)
    train_tiny(tok_dir)
    with pytest.raises(ValueError, match="gives token id .* only 131 embeddings"):
        get_peft_model(tiny_model(), PromptTuningConfig(**kw))
    model = tiny_model()
    sampled = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = sampled.prompt_encoder["default"].embedding.weight
    assert all((model.model.embed_tokens.weight == row).all(-1).any() for row in rows)


def test_loading_refuses_a_mismatched_model(tmp_path):
    ours = get_peft_model(tiny_model("llama-gqa"), ours_config("prefix"))
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["token_dim"] == 16  # n_kv x head_dim
    with pytest.raises(ValueError, match="token_dim=16 does not match the model, which needs token_dim=48"):
        PeftModel.from_pretrained(tiny_model("llama-mha"), tmp_path)


def test_clear_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got None"):
        PrefixTuningConfig()
    with pytest.raises(ValueError, match="modules_to_save"):
        PromptTuningConfig(num_virtual_tokens=2, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="init_weights must be None or 'zero'"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")
    ours = get_peft_model(tiny_model(), ours_config("prefix")).train()
    ours.base_model.gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours(IDS)
    ours.base_model.gradient_checkpointing = False
    with pytest.raises(ValueError, match=r"2-D .* got shape \(2, 1, 9, 9\).*packed rows"):
        ours(IDS, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool), position_ids=torch.arange(9).expand(2, 9))

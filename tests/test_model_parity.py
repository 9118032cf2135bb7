"""The decoder against `transformers` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)."""
import re

import pytest
import torch

from conftest import tiny_model, to_hf


def padded_batch(B=3, T=13, vocab=131, side="left", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n_pad in enumerate([0, 4, 9][:B]):
        if n_pad:
            mask[row, :n_pad] = 0 if side == "left" else 1
            if side == "right":
                mask[row, T - n_pad:] = 0
    return ids, mask


def test_logits_match_transformers_fp32(family):
    model = tiny_model(family)
    hf = to_hf(model)
    ids, _ = padded_batch()
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    # float32, same op order up to SDPA vs eager softmax: observed ~2e-7; 1e-4 is the bound.
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_matches_transformers(family, side):
    model = tiny_model(family)
    hf = to_hf(model)
    ids, mask = padded_batch(side=side)
    # Positions count real tokens only; transformers' forward needs them spelled out.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # outputs at pad positions are meaningless in both
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)
    assert torch.isfinite(ours).all()


def test_padding_does_not_change_real_tokens(family):
    """A left-padded row gives the logits of the same row alone (positions start at its first token)."""
    model = tiny_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(ids[2:3, 9:])
    torch.testing.assert_close(batched[2, 9:], alone[0], atol=1e-5, rtol=0)


def test_logits_match_transformers_bf16(family):
    model = tiny_model(family).to(torch.bfloat16)
    hf = to_hf(model)
    ids, _ = padded_batch()
    with torch.no_grad():
        ours, ref = model(ids).float(), hf(ids).logits.float()
    # bf16 keeps 8 mantissa bits (eps 2^-8 = 0.0039); logits here are O(1) and pass through
    # 2 layers whose roundings may differ (SDPA vs eager attention): allow a few ulps.
    torch.testing.assert_close(ours, ref, atol=3e-2, rtol=2e-2)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_gradients_flow_everywhere():
    model = tiny_model("qwen2").train()
    ids, mask = padded_batch()
    model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_gradient_checkpointing_gives_same_gradients():
    ids, mask = padded_batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_model("llama-gqa").train()
        model.gradient_checkpointing = ckpt
        model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=0)


def test_all_ones_mask_takes_the_causal_kernel_with_equal_logits(family):
    """An unpadded batch drops its mask (SDPA's causal kernel); the explicit 4-D mask gives the same."""
    from minipeft.model import attention_mask_4d

    model = tiny_model(family)
    ids, _ = padded_batch()
    ones = torch.ones_like(ids)
    explicit = attention_mask_4d(ones, ids.shape[1], model.config.sliding_window)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        # the same terms summed in another order: float32 rounding only
        torch.testing.assert_close(model(ids, attention_mask=ones), model(ids, attention_mask=explicit,
                                   position_ids=pos), atol=1e-5, rtol=0)


ROPE_SCALINGS = {  # head_dim 16, theta 1e4: wavelengths 6.3 .. 19869, so with a context L of 64 the llama3
    # bands all hold frequencies (unchanged below L/4 = 16, interpolated above L = 64, blended between)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(kind, tmp_path):
    """Llama 3.x checkpoints scale RoPE ("llama3"); older long-context ones "linear". Logits equal
    transformers' for both, padded too, and differ from plain RoPE's (the scaling is applied, both sides)."""
    from minipeft import load_pretrained
    model = tiny_model("llama-mha", hidden_size=64, rope_theta=10000.0, rope_scaling=ROPE_SCALINGS[kind])
    assert model.config.head_dim == 16
    hf = to_hf(model)
    ids, mask = padded_batch(T=29)
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
        plain = tiny_model("llama-mha", hidden_size=64, rope_theta=10000.0)(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)
    assert (ours[real] - plain[real]).abs().max() > 1e-3  # 3e-3 to 6e-3 here; parity holds to ~1e-7
    model.save_pretrained(tmp_path / "m")  # config.json round trip, through transformers too
    assert load_pretrained(tmp_path / "m").config.rope_scaling == ROPE_SCALINGS[kind]
    import transformers
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    hf_rope = getattr(hf_cfg, "rope_parameters", None) or hf_cfg.rope_scaling
    assert {k: hf_rope[k] for k in ROPE_SCALINGS[kind]} == ROPE_SCALINGS[kind]


@pytest.mark.parametrize("where, context", [
    ("rope_scaling", 128),  # none given: max_position_embeddings
    ("rope_parameters", 128),  # transformers 5's name, rope_theta inside
    ("top level", 32),  # config.json's own original_max_position_embeddings (Phi-3's place for it)
    ("top level over rope_scaling's", 32),  # ... which transformers takes over rope_scaling's 64
    ("no max_position_embeddings", 2048),  # LlamaConfig's default context
])
def test_llama3_scaling_without_its_original_context_falls_back_as_in_transformers(where, context, tmp_path):
    """A "llama3" rope_scaling without original_max_position_embeddings was refused; transformers
    (standardize_rope_params) takes a top-level original_max_position_embeddings, else the model's
    max_position_embeddings. Logits equal transformers' LlamaForCausalLM read from the same config.json."""
    import json

    import transformers
    from minipeft import load_pretrained
    model = tiny_model("llama-mha", hidden_size=64, rope_theta=10000.0, max_position_embeddings=128,
                       rope_scaling=ROPE_SCALINGS["llama3"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_scaling")
    if where != "top level over rope_scaling's":
        del rope["original_max_position_embeddings"]
    if where.startswith("top level"):
        config["original_max_position_embeddings"] = 32
    if where == "no max_position_embeddings":
        del config["max_position_embeddings"]
    if where == "rope_parameters":
        config["rope_parameters"] = {**rope, "rope_theta": config.pop("rope_theta")}
    else:
        config["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ours.config.rope_scaling["original_max_position_embeddings"] == context
    assert ref.config.rope_parameters["original_max_position_embeddings"] == context
    ids, mask = padded_batch(T=29)
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
        before = model(ids, attention_mask=mask)  # the context of 64 that the file no longer says
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert (got[real] - before[real]).abs().max() > 1e-4  # the context read changes the logits


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope scaling type 'yarn' is not supported"),
    # original_max_position_embeddings falls back (test below); transformers also requires these two
    ({"rope_type": "llama3", "factor": 8.0}, r"missing \['low_freq_factor', 'high_freq_factor'\], got"),
    ({"type": "linear", "factor": 0.5}, "factor must be >= 1"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, r"unsupported key\(s\) \['partial_rotary"),
])
def test_unsupported_rope_scaling_is_named(rope, message):
    from minipeft import ModelConfig
    hf = {**ModelConfig(**TINY_LLAMA).to_hf_config(), "rope_scaling": rope}
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        ModelConfig.from_hf_config(hf)


TINY_LLAMA = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def test_a_decode_step_needs_the_mask_of_the_cached_positions_too(family):
    """With a KV cache the 2-D attention_mask covers past + new tokens, as in transformers' generate.
    One covering only the new token set it at position 0 and let it see every cached key, padding
    included: silently wrong logits. It is refused, naming the expected shape; the full mask gives
    transformers' logits."""
    from minipeft.model import KVCache
    model = tiny_model(family)
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = to_hf(model)(ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        cache = KVCache(model.config.num_hidden_layers)
        model(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, cache.length \+ T\) = \(3, 13\)"
                                             r".*got \(3, 1\)"):
            model(ids[:, -1:], attention_mask=mask[:, -1:], cache=cache)
        step = model(ids[:, -1:], attention_mask=mask, cache=cache)[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=0)  # float32, as the parity tests above


def test_one_row_of_position_ids_serves_every_row_as_in_transformers(family):
    """position_ids (1, T) broadcast over the batch in transformers and here. (T,) lines up with the heads
    in both: wrong logits without an error where T equals the head count, a crash elsewhere. It is
    refused here, as is any shape but (B, T) and (1, T), naming both."""
    model = tiny_model(family)
    hf = to_hf(model)
    ids = torch.randint(0, 131, (3, 4))  # T = 4 = llama-mha's head count: the silent case
    row = torch.arange(5, 9)[None]  # positions 5..8: an offset shows, arange(T) would match the default
    with torch.no_grad():
        ours = model(ids, position_ids=row)
        torch.testing.assert_close(ours, hf(ids, position_ids=row).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours, model(ids, position_ids=row.expand(3, 4)), atol=0, rtol=0)
        try:  # transformers with (T,): a broadcast error, or where T = the head count other logits, silently
            assert (hf(ids, position_ids=row[0]).logits - ours).abs().max() > 1e-4
        except RuntimeError:
            pass
        for shape in [(4,), (2, 4), (1, 5), (3, 3), (1, 1, 4)]:
            bad = torch.zeros(shape, dtype=torch.long)
            with pytest.raises(ValueError, match=re.escape(f"position_ids must be (batch, T) = (3, 4), or (1, T) = "
                                                           f"(1, 4) shared by every row; got {shape}")):
                model(ids, position_ids=bad)

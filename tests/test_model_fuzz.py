"""Seeded random small configs of every family against `transformers` (LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM), the weights carried by minipeft's save_pretrained and read by
transformers' from_pretrained, so the conversion is under test too.

test_model_parity.py checks one fixed tiny config per family; here each case draws its own: head counts
with GQA ratios 1, 2, 4 and MQA, an explicit head_dim other than hidden/heads, 1-3 layers, a vocabulary
that is not a power of two, rope_theta, linear or llama3 rope scaling with random factors, Mistral's
sliding window shorter than the sequence, Qwen2's q/k/v biases and LLaMA's (o_proj too), tied or untied
embeddings, rms_norm_eps; and compares, per case, the full batch, a left-padded batch with rows of
different lengths, logits_to_keep on it, a prefill then a decode in random chunks (1 to 3 tokens) with
the KV cache, padded, past the window, and greedy generate() with eos and pad. A failure names the case
and its config, so `pytest -k "case and 17"` replays it.
"""
from __future__ import annotations

import random

import pytest
import torch

from minipeft import KVCache, ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

CASES = 40
# float32: the same math in another order (SDPA vs eager softmax, chunked decode): observed <= 1.5e-6
# of the logits' scale on these draws
FP32 = 1e-4
# bfloat16 (8 mantissa bits) through up to 3 layers: the error against the float32 reference, relative
# to the logits' scale, reaches 5.2e-2 here on these draws and 6.1e-2 in transformers' own bfloat16 run
# (roundings land in other places: SDPA vs eager attention, fused RMSNorm).
BF16 = 1e-1


def draw_config(case: int) -> dict:
    """Case i's config: the family, GQA ratio, tying and rope type cycle so that every combination
    turns up within the first dozen cases; the rest is drawn from Random(case)."""
    rng = random.Random(case)
    family = ("llama", "mistral", "qwen2")[case % 3]
    ratio = (1, 2, 4, "mqa")[case % 4]
    kv = 1 if ratio == "mqa" else rng.choice([1, 2, 3])
    heads = rng.choice([1, 2, 4, 6]) if ratio == "mqa" else kv * ratio
    head_dim = rng.choice([None, 6, 8, 10, 12, 16, 20])
    hidden = rng.choice([24, 32, 40, 48, 64])
    if family == "llama" or head_dim is None:
        hidden = heads * rng.choice([4, 6, 8, 10])  # LlamaConfig needs heads | hidden; hidden/heads even
    cfg = dict(model_type=family, vocab_size=rng.choice([97, 131, 150, 203, 251]), hidden_size=hidden,
               intermediate_size=rng.choice([36, 50, 72, 88]), num_hidden_layers=rng.randint(1, 3),
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
               rms_norm_eps=10 ** rng.uniform(-7, -3), tie_word_embeddings=case % 2 == 0,
               rope_theta=rng.choice([10000.0, 500000.0, 1e6, rng.uniform(50, 5e4)]),
               max_position_embeddings=rng.choice([64, 128, 2048]), bos_token_id=None, eos_token_id=None)
    rope = (None, "linear", "llama3")[(case // 3) % 3]
    if rope == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": rng.uniform(1, 8)}
    elif rope == "llama3":  # a short original context, so its three bands all hold frequencies
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": rng.uniform(1, 32),
                               "low_freq_factor": rng.uniform(0.5, 2), "high_freq_factor": rng.uniform(2.5, 8),
                               "original_max_position_embeddings": rng.randint(8, 64)}
    if family == "mistral":
        cfg["sliding_window"] = rng.choice([None, rng.randint(2, 6), rng.randint(2, 6)])
    cfg["attention_bias"] = family == "qwen2" or (family == "llama" and rng.random() < 0.4)
    return cfg


def build(cfg: dict, seed: int) -> Transformer:
    """Weights of std 0.15 (not 0.02) and random norms and biases: logits of order 1 whose argmax is
    far from a tie, so greedy ids compare exactly, and a tensor mapped wrongly shows."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.15 if name.endswith("weight") else 0.2)
    return model.eval()


def load_hf(model: Transformer, path):
    model.save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the error relative to the logits' scale."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def left_padded(rng: random.Random, B: int, T: int, vocab: int):
    """ids (B, T), mask with row 0 full and the others left-padded to different lengths (>= 2 tokens),
    and the positions transformers' generate gives them (real tokens count from 0)."""
    ids = torch.tensor([[rng.randrange(vocab) for _ in range(T)] for _ in range(B)])
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n_pad in enumerate(rng.sample(range(1, T - 1), B - 1), start=1):
        mask[row, :n_pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def decode_in_chunks(model: Transformer, ids, mask, prefill: int, rng: random.Random) -> torch.Tensor:
    """Logits (B, T, V) from a prefill of `prefill` tokens, then chunks of 1 to 3 tokens through the cache."""
    cache = KVCache(model.config.num_hidden_layers)
    outs, t = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache)], prefill
    while t < ids.shape[1]:
        end = min(ids.shape[1], t + rng.randint(1, 3))
        outs.append(model(ids[:, t:end], attention_mask=mask[:, :end], cache=cache))
        t = end
    assert cache.length == t
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("case", range(CASES))
def test_random_config_matches_transformers(case, tmp_path):
    cfg = draw_config(case)
    model = build(cfg, case)
    hf = load_hf(model, tmp_path)
    where = f"case {case}: {cfg}"
    ours_state = model.state_dict()  # the conversion: every tensor as saved, the tied head as the embedding
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, ours_state[name]), f"{where}: {name}"
    rng = random.Random(1000 + case)
    B, T, V = 3, rng.randint(10, 16), cfg["vocab_size"]
    ids, mask, pos = left_padded(rng, B, T, V)
    real = mask.bool()  # the outputs at pad positions are meaningless on both sides
    with torch.no_grad():
        ref_full = hf(ids).logits
        assert rel_err(model(ids), ref_full) <= FP32, f"{where}: full batch"
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        assert rel_err(model(ids, attention_mask=mask)[real], ref[real]) <= FP32, f"{where}: left-padded batch"
        n = rng.randint(1, int(mask.sum(-1).min()))  # positions real in every row
        kept = model(ids, attention_mask=mask, logits_to_keep=n)
        assert kept.shape == (B, n, V) and rel_err(kept, ref[:, -n:]) <= FP32, f"{where}: logits_to_keep={n}"
        prefill = rng.randint(1, T - 1)
        stepped = decode_in_chunks(model, ids, mask, prefill, rng)
        assert rel_err(stepped[real], ref[real]) <= FP32, f"{where}: cached decode from prefill {prefill}"
        bf16 = rel_err(build(cfg, case).to(torch.bfloat16)(ids), ref_full)
        assert bf16 <= BF16, f"{where}: bfloat16 error {bf16:.3g}"

    prompt = ids.masked_fill(~real, 0)
    free = model.generate(prompt, 6, attention_mask=mask)  # no eos: every row runs 6 steps
    eos = int(free[1, T + 2])  # row 1 stops by step 3, the others most likely run on
    eos_ids = [eos, V - 1] if case % 2 else eos  # a list: any of them ends a row
    pad = min(set(range(V)) - set(free.flatten().tolist()))  # told apart from generated tokens
    ours = model.generate(prompt, 6, attention_mask=mask, eos_token_id=eos_ids, pad_token_id=pad)
    want = hf.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos_ids,
                       pad_token_id=pad, min_new_tokens=0)
    assert torch.equal(ours, want), f"{where}: greedy generate\n{ours[:, T:].tolist()}\n{want[:, T:].tolist()}"
    assert (ours[1, T + 3:] == pad).all()


def test_the_draws_cover_every_feature():
    """The cycle in draw_config reaches each feature the fuzz claims, in each family where it exists."""
    cfgs = [draw_config(i) for i in range(CASES)]
    for family in ("llama", "mistral", "qwen2"):
        fam = [c for c in cfgs if c["model_type"] == family]
        ratios = {c["num_attention_heads"] // c["num_key_value_heads"] for c in fam}
        assert {1, 2, 4} <= ratios and any(c["num_key_value_heads"] == 1 < c["num_attention_heads"] for c in fam)
        assert {c["tie_word_embeddings"] for c in fam} == {True, False}
        assert {(c.get("rope_scaling") or {}).get("rope_type") for c in fam} == {None, "linear", "llama3"}
        assert {c["num_hidden_layers"] for c in fam} == {1, 2, 3}
        assert any(c["head_dim"] not in (None, c["hidden_size"] // c["num_attention_heads"]) for c in fam)
    assert sum(1 for c in cfgs if (c.get("sliding_window") or 99) < 10) >= 5  # shorter than every sequence
    assert {c["attention_bias"] for c in cfgs if c["model_type"] == "llama"} == {True, False}
    assert all(c["vocab_size"] & (c["vocab_size"] - 1) for c in cfgs)  # none a power of two


def test_sliding_window_decode_past_the_window_matches_transformers(tmp_path):
    """Mistral, window 3: a prefill of 6 > 3 tokens, then chunks of 1 to 3 tokens to 12 (transformers:
    token by token), left-padded. Ours equals transformers' full forward; transformers' own cache
    (DynamicSlidingWindowLayer, which drops the keys that left the window) agrees with its full forward
    here in 5.25, so either is the reference."""
    cfg = dict(model_type="mistral", vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, sliding_window=3)
    model = build(cfg, 0)
    hf = load_hf(model, tmp_path)
    ids, mask, pos = left_padded(random.Random(0), 3, 12, 97)
    real = mask.bool()
    cache = None
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        ours = decode_in_chunks(model, ids, mask, 6, random.Random(0))
        theirs = []
        for start, end in [(0, 6)] + [(t, t + 1) for t in range(6, 12)]:
            out = hf(ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                     cache=cache, use_cache=True)
            theirs.append(out.logits)
            cache = out.past_key_values
    assert rel_err(ours[real], ref[real]) <= FP32
    assert rel_err(torch.cat(theirs, 1)[real], ref[real]) <= FP32
    model.config.sliding_window = None  # the window matters: without it the logits differ
    with torch.no_grad():
        assert rel_err(model(ids, attention_mask=mask)[real], ref[real]) > 1e-2


def test_llama_hidden_size_must_be_a_multiple_of_the_heads_as_in_transformers(tmp_path):
    """hidden_size 40 with 6 heads of an explicit head_dim 8 built and saved a LLaMA whose config.json
    transformers' LlamaConfig refuses ("The hidden size (40) is not a multiple of the number of attention
    heads (6)"), head_dim given or not. It is refused here too, naming both; Mistral and Qwen2 take it in
    both libraries, with equal logits."""
    shape = dict(vocab_size=97, hidden_size=40, intermediate_size=48, num_hidden_layers=1, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"model_type 'llama': hidden_size \(40\) must be a multiple of "
                                         r"num_attention_heads \(6\)"):
        ModelConfig(model_type="llama", **shape)
    with pytest.raises(Exception, match=r"hidden size \(40\) is not a multiple of the number of attention heads"):
        transformers.AutoConfig.for_model(model_type="llama", **shape)
    hf_json = {**ModelConfig(model_type="mistral", **shape).to_hf_config(), "model_type": "llama"}
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama': hidden_size \(40\)"):
        ModelConfig.from_hf_config(hf_json)
    for family in ("mistral", "qwen2"):
        model = build(dict(shape, model_type=family, attention_bias=family == "qwen2"), 0)
        hf = load_hf(model, tmp_path / family)
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert rel_err(model(ids), hf(ids).logits) <= FP32

"""logits_to_keep (only the last n positions, the last layer computing only those) and
metrics.scored_suffix (the n a shifted loss needs): same outputs, same loss, same gradients."""
import pytest
import torch

from conftest import tiny_model, to_hf
from minipeft.lora import LoraConfig
from minipeft.metrics import IGNORE_INDEX, head_loss, scored_suffix
from minipeft.model import KVCache, attention_mask_4d
from minipeft.peft_model import get_peft_model
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
from test_model_parity import padded_batch

T = 13
KEEP = [1, 4, T - 1, T, T + 5]  # n >= T: all positions


@pytest.mark.parametrize("n", [1, 5])
def test_matches_transformers_logits_to_keep(family, n):
    model = tiny_model(family)
    ids, _ = padded_batch(T=T)
    with torch.no_grad():
        ours, ref = model(ids, logits_to_keep=n), to_hf(model)(ids, logits_to_keep=n).logits
    assert ours.shape == (3, n, 131)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # as test_model_parity


def full_and_kept(model, n, **kwargs):
    with torch.no_grad():
        return model(**kwargs), model(**kwargs, logits_to_keep=n)


@pytest.mark.parametrize("n", KEEP)
@pytest.mark.parametrize("inputs", ["plain", "left-padded", "right-padded", "packed-4d", "hidden"])
def test_equals_the_last_positions_of_the_full_run(family, inputs, n):
    """Float32; the kept run builds an explicit causal mask where the full one used SDPA's causal
    kernel, so the sums differ in order only (~1e-7): 1e-5."""
    model = tiny_model(family)
    ids, mask = padded_batch(T=T, side="right" if inputs == "right-padded" else "left")
    kwargs = {"input_ids": ids}
    if inputs.endswith("padded"):
        kwargs["attention_mask"] = mask
    if inputs == "packed-4d":
        kwargs["attention_mask"] = attention_mask_4d(mask, T, model.config.sliding_window)
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if inputs == "hidden":
        kwargs["return_hidden"] = True
    full, kept = full_and_kept(model, n, **kwargs)
    assert kept.shape[1] == min(n, T)
    torch.testing.assert_close(kept, full[:, -n:], atol=1e-5, rtol=0)


def test_with_a_kv_cache_and_in_bfloat16(family):
    """Decoding after a prefill (the mask spans past + current keys); bf16 within a few ulps."""
    model = tiny_model(family)
    ids, _ = padded_batch(T=T)
    outs = []
    for n in (0, 3):
        cache = KVCache(model.config.num_hidden_layers)
        with torch.no_grad():
            model(ids[:, :6], cache=cache)
            outs.append(model(ids[:, 6:], cache=cache, logits_to_keep=n))
        assert cache.length == T  # the last layer still cached every position's keys and values
    torch.testing.assert_close(outs[1], outs[0][:, -3:], atol=1e-5, rtol=0)
    bf16 = model.to(torch.bfloat16)
    full, kept = full_and_kept(bf16, 4, input_ids=ids)
    torch.testing.assert_close(kept.float(), full[:, -4:].float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_peft_models_pass_it_through(method):
    config = {"lora": LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
              "prompt": PromptTuningConfig(num_virtual_tokens=3),
              "prefix": PrefixTuningConfig(num_virtual_tokens=3)}[method]
    model = get_peft_model(tiny_model("llama-gqa"), config).eval()
    ids, mask = padded_batch(T=T, side="right")
    for n in (1, 4, T + 3):
        full, kept = full_and_kept(model, n, input_ids=ids, attention_mask=mask)
        assert full.shape[1] == T
        torch.testing.assert_close(kept, full[:, -n:], atol=1e-5, rtol=0)


def test_scored_suffix():
    L = IGNORE_INDEX
    labels = torch.tensor([[L, L, L, L, 5, 6, L],  # row 0: first scored target at t = 3 (predicts 5)
                           [L, L, L, L, L, 7, 8]])
    assert scored_suffix(labels) == 7 - 3
    assert scored_suffix(torch.tensor([[L, 4, 5]])) == 3  # scored from the first prediction on
    assert scored_suffix(torch.tensor([[4, L, L]])) == 1  # the first label is never a target
    assert scored_suffix(torch.full((2, 5), L)) == 1  # nothing scored: one position, loss 0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_trainer_loss_and_lora_gradients_are_unchanged(checkpointing):
    """head_loss over the kept suffix (what the Trainer computes) equals it over all positions,
    gradients of every LoRA weight included, on rows whose prompts differ in length."""
    ids, mask = padded_batch(T=T, side="right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :6], labels[1, :8], labels[2, :3] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    n = scored_suffix(labels)
    assert n == T - 2
    results = []
    for keep in (0, n):
        model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules="all-linear",
                                                                init_lora_weights=False)).train()
        model.base_model.gradient_checkpointing = checkpointing
        hidden = model(ids, attention_mask=mask, return_hidden=True, logits_to_keep=keep)
        loss = head_loss(hidden, labels[:, -keep:], model.get_output_embeddings())
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (loss_full, grads_full), (loss_kept, grads_kept) = results
    torch.testing.assert_close(loss_kept, loss_full, atol=1e-6, rtol=0)
    assert grads_full.keys() == grads_kept.keys() and len(grads_full) == 2 * 7 * 2
    for k in grads_full:
        torch.testing.assert_close(grads_kept[k], grads_full[k], atol=1e-6, rtol=1e-5, msg=k)


def test_negative_is_an_error():
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        tiny_model()(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=-1)


def matmul_flops(fn) -> int:
    with torch.profiler.profile(with_flops=True) as prof:
        fn()
    return sum(e.flops for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


@pytest.mark.parametrize("n", [0, 1, 4])
def test_the_skipped_positions_cost_no_multiplies(n):
    """Forward multiply FLOPs, counted by torch.profiler, equal the count written out: every layer
    projects all T positions but the last, which projects keys and values for all and queries,
    o_proj, the MLP and lm_head for the n kept ones only."""
    model = tiny_model("llama-gqa")
    c = model.config
    ids, _ = padded_batch(T=T)
    B, d, q_out, kv_out = ids.shape[0], c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    rows = B * (n or T)
    layer = lambda m: 2 * m * (d * q_out + q_out * d + 3 * d * c.intermediate_size)  # q, o, gate, up, down
    kv = 2 * B * T * 2 * d * kv_out
    want = (c.num_hidden_layers - 1) * (layer(B * T) + kv) + layer(rows) + kv + 2 * rows * d * c.vocab_size
    with torch.no_grad():
        assert matmul_flops(lambda: model(ids, logits_to_keep=n)) == want


def test_exactly_one_of_input_ids_and_inputs_embeds():
    """As transformers: both given is ambiguous (the ids were silently ignored, even of another batch
    size), neither is an error naming them."""
    model = tiny_model()
    ids = torch.zeros(1, 3, dtype=torch.long)
    embeds = model.model.embed_tokens(torch.ones(2, 3, dtype=torch.long))
    for kwargs in ({"input_ids": ids, "inputs_embeds": embeds}, {}):
        with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
            model(**kwargs)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds), model(torch.ones(2, 3, dtype=torch.long)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 4])
def test_a_model_without_layers_keeps_the_last_positions_too(n):
    """With no decoder layer there is no last layer to drop the other positions: logits_to_keep must
    still return (B, n, V), the last n of the full run (transformers: the same, by slicing)."""
    model = tiny_model(num_hidden_layers=0)
    ids, _ = padded_batch(T=T)
    full, kept = full_and_kept(model, n, input_ids=ids)
    assert full.shape[1] == T and kept.shape[1] == n
    torch.testing.assert_close(kept, full[:, -n:], rtol=0, atol=1e-6)  # lm_head on fewer rows: other blocking
    with torch.no_grad():
        torch.testing.assert_close(kept, to_hf(model)(ids, logits_to_keep=n).logits, atol=1e-5, rtol=0)

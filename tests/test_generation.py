"""Greedy generation equals `transformers`' greedy generate; the KV cache changes nothing; the
presence and frequency penalties follow OpenAI's formula."""
import pytest
import torch

from minipeft.generation import apply_penalties, filter_logits, generate, sample_next
from conftest import tiny_model, to_hf
from test_model_parity import padded_batch


def hf_greedy(hf, ids, mask, n, eos, pad):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                       pad_token_id=pad, min_new_tokens=0)


def mid_way_eos(free: torch.Tensor, T: int) -> tuple[int, int, int]:
    """(row, step, token): a token that `row` first emits at generated step >= 2, so that it stops
    mid-way, and that another row never emits, so that the batch runs on past it."""
    new = free[:, T:]
    for r in range(len(new)):
        for t in range(2, new.shape[1] - 2):
            tok = new[r, t]
            if tok not in new[r, :t] and any(tok not in new[o] for o in range(len(new)) if o != r):
                return r, t, int(tok)
    raise AssertionError(f"no row stops mid-way with any eos: {new.tolist()}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers_batched_left_padding(family, use_cache):
    # Tied random embeddings make the tiny Qwen2 repeat its last token (argmax of E h ~ the input's own
    # row), so no row could stop mid-way; untied, it generates varied text like the others.
    model = tiny_model(family, **({"tie_word_embeddings": False} if family == "qwen2" else {}))
    hf = to_hf(model)
    ids, mask = padded_batch(T=7)
    ids = ids.masked_fill(mask == 0, 0)
    free = model.generate(ids, 12, attention_mask=mask, use_cache=use_cache)
    row, step, eos = mid_way_eos(free, 7)
    pad = next(t for t in range(model.config.vocab_size) if t not in free[:, 7:])  # told apart from generated tokens
    ours = model.generate(ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, use_cache=use_cache)
    ref = hf_greedy(hf, ids, mask, 12, eos, pad)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[row, :7 + step + 1], free[row, :7 + step + 1])  # up to and with its eos
    assert (ours[row, 7 + step + 1:] == pad).all() and ours.shape[1] > 7 + step + 1  # stopped; others ran on


def test_cache_and_no_cache_give_identical_logits(family):
    model = tiny_model(family)
    ids, mask = padded_batch(T=9)
    from minipeft import KVCache

    full = model(ids, attention_mask=mask)
    cache = KVCache(model.config.num_hidden_layers)
    steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]
    for t in range(5, 9):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=0)


def test_generation_stops_when_all_rows_finish():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 131, (1, 4))
    first = int(model.generate(ids, 1)[0, -1])
    out = model.generate(ids, 50, eos_token_id=first)
    assert out.shape == (1, 5)


def test_sampling_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)
    # Nucleus: the smallest prefix of the sorted tokens whose mass reaches top_p.
    top_p = float(p[0] + p[1]) - 1e-3  # needs tokens 0 and 1 exactly
    assert set(sample_next(logits, 1.0, top_p=top_p, generator=g).tolist()) == {0, 1}
    drawn = sample_next(logits, 1.0, generator=g)
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    torch.testing.assert_close(freq, p, atol=0.04, rtol=0)  # 2000 draws: std <= 0.011
    assert torch.equal(sample_next(logits, 0.0), torch.zeros(2000, dtype=torch.long))


@pytest.mark.parametrize("temperature", [1e-20, 1e-40, 5e-324])
def test_a_tiny_temperature_draws_the_argmax(temperature):
    """logits / 1e-40 overflowed to +-inf and softmax gave NaN (multinomial raised: a 500 from the
    platform); shifted by their maximum first, the others go to -inf and the argmax is drawn, ties
    evenly, as the limit temperature -> 0 says."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 4.0, -1.0]]).repeat(1000, 1)
    drawn = sample_next(logits, temperature, top_p=1e-300, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0} and sample_next(logits, temperature, generator=torch.Generator()).max() <= 3
    tied = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
    assert set(tied.tolist()) == {0, 3} and 400 < int((tied == 0).sum()) < 600


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model("llama-mha")
    ids = torch.randint(0, 131, (2, 3))
    a = model.generate(ids, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("top_k,top_p", [(0, None), (1, None), (3, None), (10, None), (50, None), (None, 0.0),
                                         (None, 0.3), (None, 0.9), (None, 1.0), (0, 0.0), (4, 0.5), (2, 0.99)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    """transformers' sampling order: temperature, TopKLogitsWarper (top_k=0: not applied, generate's
    convention), TopPLogitsWarper (top_p=1: not applied); the surviving logits are the same exactly."""
    import transformers.generation.logits_process as gen
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits / 0.7
    if top_k:
        expected = gen.TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None and top_p < 1.0:
        expected = gen.TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(filter_logits(logits / 0.7, top_k, top_p), expected, atol=0, rtol=0)
    drawn = sample_next(logits, 0.7, top_k, top_p, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(expected.gather(-1, drawn[:, None])).all()
    if top_p == 0.0:  # only the most likely token survives
        assert torch.equal(drawn, logits.argmax(-1))


def test_bad_top_k_and_top_p_are_refused():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top_k must be a positive integer.*got -1"):
        sample_next(logits, 1.0, top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\], got 1.5"):
        sample_next(logits, 1.0, top_p=1.5)


@pytest.mark.parametrize("presence,frequency", [(0.6, 0.25), (-1.5, 0.5), (0.3, -2.0), (-2.0, -0.7)])
def test_apply_penalties_matches_openais_formula_token_by_token(presence, frequency):
    """Rows with different histories: a token generated several times, one once, an empty reply."""
    histories = [[4, 4, 4, 1, 6], [0, 2, 2, 5], []]
    V = 7
    logits = torch.randn(len(histories), V, generator=torch.Generator().manual_seed(0))
    counts = torch.stack([torch.bincount(torch.tensor(h, dtype=torch.long), minlength=V) for h in histories])
    expected = [[float(logits[b, j]) - h.count(j) * frequency - (presence if j in h else 0.0) for j in range(V)]
                for b, h in enumerate(histories)]
    torch.testing.assert_close(apply_penalties(logits, counts, presence, frequency), torch.tensor(expected))


@pytest.mark.parametrize("presence,frequency", [(0.8, 0.5), (-1.0, 0.3), (0.0, -0.2)])
def test_greedy_generate_with_penalties_equals_a_loop_that_applies_them(presence, frequency):
    """Penalties move greedy's argmax (as OpenAI's do); each row counts its own reply, not the prompt."""
    model = tiny_model("mistral")
    V, T = model.config.vocab_size, 5
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    rows = ids.tolist()
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor(rows))[:, -1]
            for b, row in enumerate(rows):
                reply = row[T:]
                scores = [float(logits[b, j]) - reply.count(j) * frequency - (j in reply) * presence for j in range(V)]
                row.append(max(range(V), key=scores.__getitem__))
    ours = generate(model, ids, 12, presence_penalty=presence, frequency_penalty=frequency)
    assert ours.tolist() == rows
    free = generate(model, ids, 12)
    assert all(not torch.equal(ours[b], free[b]) for b in range(2)), "the penalties change both replies"


def test_a_large_presence_penalty_stops_repeats():
    model = tiny_model("qwen2")  # tied random embeddings: greedy repeats the last token
    ids = torch.randint(0, 131, (2, 5), generator=torch.Generator().manual_seed(1))
    free = generate(model, ids, 12)[:, 5:].tolist()
    assert all(len(set(reply)) < len(reply) for reply in free)
    penalized = generate(model, ids, 12, presence_penalty=2.0)[:, 5:].tolist()
    assert all(len(set(reply)) == len(reply) for reply in penalized), penalized


@pytest.mark.parametrize("temperature", [float("nan"), -0.5])
def test_a_temperature_that_is_not_a_number_above_or_at_0_is_refused(temperature):
    """NaN passed the `temperature < 0` check and failed later inside torch.multinomial ("probability
    tensor contains either inf, nan or element < 0"): `minipeft generate --temperature nan` was a traceback."""
    model = tiny_model("llama-mha")
    with pytest.raises(ValueError, match=f"temperature must be >= 0, got {temperature}"):
        generate(model, torch.tensor([[1, 2, 3]]), 2, temperature=temperature)


def test_the_cli_prints_a_continuation_with_its_leading_space(capsys):
    """`minipeft generate --prompt` prints what the reply adds to the prompt's text: decoded alone, its
    first piece ("▁value") lost its space, and prompt + output read "...thevalue"."""
    from minipeft.cli import main
    from minipeft.job import DEFAULT_MODEL
    from minipeft import load_pretrained, load_tokenizer
    prompt = "The function returns the"
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.removesuffix("\n")
    tok, model = load_tokenizer(DEFAULT_MODEL), load_pretrained(DEFAULT_MODEL)
    ids = tok.encode(prompt, bos=True)
    new = generate(model, torch.tensor([ids]), 6, eos_token_id=model.config.eos_token_id)[0, len(ids):].tolist()
    assert printed == tok.decode(ids + new)[len(prompt):] and printed.startswith(" ")


def test_a_right_padded_attention_mask_is_refused():
    """Each row's next token is read from the last column: a right-padded row read it after its
    padding and generated garbage without a word (transformers only warns)."""
    model = tiny_model("llama-mha")
    ids, mask = padded_batch(T=13, side="right")
    with pytest.raises(ValueError, match=r"attention_mask: row 1 ends with padding.*pad on the left"):
        generate(model, ids, 2, attention_mask=mask)


def test_a_model_without_a_config_needs_use_cache_false():
    """A callable without .config crashed with "'NoneType' object has no attribute 'num_hidden_layers'"
    once the KV cache was built; it is refused up front, and runs without the cache."""
    model = tiny_model("llama-mha")

    def bare(ids, **kwargs):  # the Transformer's call, no .config
        return model(ids, **kwargs)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, **kwargs):
            return self.inner(ids, **kwargs)

    ids = torch.tensor([[1, 2, 3]])
    for callable_, name in ((bare, "bare"), (Wrapper(), "Wrapper")):
        with pytest.raises(ValueError, match=f"use_cache=True needs model.config.num_hidden_layers .*which "
                                             f"[^ ]*{name} lacks; pass use_cache=False"):
            generate(callable_, ids, 4)
        assert torch.equal(generate(callable_, ids, 4, use_cache=False), generate(model, ids, 4))


def test_generate_stops_at_the_models_own_eos_as_transformers():
    """Without eos_token_id, transformers' generate stops at the model config's eos; minipeft ran on,
    repeating it. eos_token_id=[] runs to max_new_tokens."""
    model = tiny_model()
    prompt = torch.tensor([[1, 5, 9, 4]])
    free = model.generate(prompt, 6, eos_token_id=[])
    eos = int(free[0, prompt.shape[1] + 1])  # the second token generated: the run stops there
    model.config.eos_token_id, model.config.pad_token_id = eos, None
    ours = model.generate(prompt, 6)
    theirs = to_hf(model).generate(prompt, max_new_tokens=6, do_sample=False)
    assert ours.tolist() == theirs.tolist() == free[:, :prompt.shape[1] + 2].tolist()

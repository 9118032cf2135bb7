"""Seeded random parity of prefix and prompt tuning against `peft` 0.22 (test-only reference).

tests/test_prefix_prompt.py checks fixed cases (P = 5, four families); here 25 drawn cases vary
what those fix: P in 1..20 (past Mistral's 5-key window), prefix_projection with a drawn
encoder_hidden_size, prompt init RANDOM or TEXT (a tokenizer), MHA / GQA / MQA, tied or untied
embeddings, and the same trained-looking prompt weights in both libraries. Per case:

- logits of a full batch (with and without an all-ones mask) and of a left-padded batch;
- the loss for labels with -100 on pads and on drawn positions, and every prompt parameter's gradient;
- greedy generation with minipeft's KV cache against peft's generate(do_sample=False): ids exactly,
  and each step's logits against peft's (output_logits);
- files one way (minipeft saves, peft loads) or the other, and adapter_config.json field by field.

Tolerances (float32, eager attention both sides; every draw also passes at a tenth of them):
logits and the loss atol 1e-5; gradients atol 1e-6 + rtol 1e-4 (sums over the batch, B·T·V terms).

Padding semantics. Both extend the mask by P ones in front. Prefix tuning: peft's generate numbers
a left-padded row's real tokens P, P+1, ... (transformers' generate derives position_ids from the
mask, peft shifts them by P), as minipeft does always; peft's plain forward without position_ids
numbers pads too, as any transformers forward does, so its forward is compared given
position_ids = cumsum(mask) - 1. Prompt tuning: peft drops position_ids in its forward and in its
generate, so it numbers pads too, in both: a left-padded row's output then depends on its padding
(test_peft_prompt_tuning_output_depends_on_left_padding). There, minipeft is compared with peft's
own numbering passed explicitly, and minipeft's left-padded generation with peft's on each row unpadded.
"""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from minipeft.metrics.lm import causal_lm_loss
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
from conftest import WORDS, tiny_model, to_hf
from test_model_parity import padded_batch

import peft

pytestmark = pytest.mark.filterwarnings("ignore:.*(past_key_values|is_gradient_checkpointing|Position ids).*")

N_CASES = 25
ATOL = 1e-5
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)
# Fields peft writes and minipeft does not: provenance, and defaults minipeft's loader takes as given
# (inference_mode: the loader's is_trainable decides; num_transformer_submodules: 1 on a decoder).
PEFT_ONLY_FIELDS = {"peft_version", "auto_mapping", "revision", "inference_mode", "num_transformer_submodules"}


def draw(i: int) -> dict:
    rng = random.Random(1000 + i)
    family = rng.choice(["llama-mha", "llama-gqa", "mqa", "mistral", "qwen2"])
    case = dict(i=i, family=family, seed=rng.randrange(100), tied=rng.random() < 0.5, P=rng.randint(1, 20),
                T=rng.randint(10, 14), new=rng.randint(2, 6), ours_saves=rng.random() < 0.5,
                method=rng.choice(["prefix", "prefix", "prompt", "prompt"]), kw={})
    if case["method"] == "prefix" and rng.random() < 0.5:
        case["kw"] = dict(prefix_projection=True, encoder_hidden_size=rng.choice([None, rng.randint(3, 40)]))
    elif case["method"] == "prompt" and rng.random() < 0.4:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        case["kw"] = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    return case


CASES = [draw(i) for i in range(N_CASES)]


def case_id(c: dict) -> str:
    extra = "-proj" if c["kw"].get("prefix_projection") else "-text" if "prompt_tuning_init" in c["kw"] else ""
    return f"{c['i']}-{c['method']}{extra}-{c['family']}{'-tied' if c['tied'] else ''}-P{c['P']}"


def base_model(c: dict, vocab_size: int):
    family, overrides = c["family"], dict(tie_word_embeddings=c["tied"], vocab_size=vocab_size)
    if family == "mqa":
        family, overrides["num_key_value_heads"] = "llama-gqa", 1
    return tiny_model(family, seed=c["seed"], **overrides)


def configs(c: dict, tok_dir):
    kw = dict(num_virtual_tokens=c["P"], **c["kw"])
    if "prompt_tuning_init" in kw:
        kw["tokenizer_name_or_path"] = str(tok_dir)
    cls = PrefixTuningConfig if c["method"] == "prefix" else PromptTuningConfig
    return cls(**kw), getattr(peft, cls.__name__)(task_type="CAUSAL_LM", **kw)


def peft_forward(ref, c, ids, mask, **kw):
    """peft's output for the real tokens (positions as in the module docstring)."""
    if c["method"] == "prefix":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    out = ref(ids, attention_mask=mask, **kw)
    return out, out.logits[:, c["P"]:] if c["method"] == "prompt" else out.logits  # prompt: (B, P+T, V)


def our_forward(ours, c, ids, mask):
    if c["method"] == "prompt" and not mask[:, 0].all():  # peft's numbering of pads, see the module docstring
        return ours(ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    return ours(ids, attention_mask=mask)


def peft_generate(ref, ids, mask, new):
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def check_generation(ours, ref, c, ids, mask):
    """Greedy ids and each step's logits, minipeft (KV cache) against peft's generate."""
    new, T = c["new"], ids.shape[1]
    ours_ids = ours.generate(ids, new, attention_mask=mask, eos_token_id=[])
    assert torch.equal(ours_ids, ours.generate(ids, new, attention_mask=mask, eos_token_id=[], use_cache=False))
    ref_ids, ref_step_logits = peft_generate(ref, ids, mask, new)
    full_mask = torch.cat((mask, torch.ones(len(ids), new, dtype=mask.dtype)), dim=1)
    with torch.no_grad():  # each step's logits, recomputed on peft's sequence: peft's own and ours
        _, ref_full = peft_forward(ref, c, ref_ids, full_mask)
        ours_full = our_forward(ours, c, ref_ids, full_mask)
    torch.testing.assert_close(ref_step_logits, ref_full[:, T - 1:-1], atol=ATOL, rtol=0)  # peft agrees with itself
    torch.testing.assert_close(ours_full[:, T - 1:-1], ref_step_logits, atol=ATOL, rtol=0)
    if c["method"] == "prefix" or mask.all():
        assert torch.equal(ours_ids, ref_ids)
        return
    if c["family"] == "mistral":  # its window counts pad columns, as transformers': padding changes the output
        return
    for row in range(len(ids)):  # prompt tuning, left-padded: peft's generate on the row without its padding
        real = ids[row:row + 1, mask[row].bool()]
        assert torch.equal(ours_ids[row, -real.shape[1] - new:], peft_generate(ref, real, torch.ones_like(real),
                                                                              new)[0][0]), row


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_random_case_matches_peft(c, tok_dir, tmp_path):
    vocab = 384 if "prompt_tuning_init" in c["kw"] else 131  # TEXT init: the tokenizer's 384 pieces
    ours_cfg, ref_cfg = configs(c, tok_dir)
    ours = get_peft_model(base_model(c, vocab), ours_cfg).eval()
    ref = peft.get_peft_model(to_hf(base_model(c, vocab)), ref_cfg).eval()
    ref.generation_config.eos_token_id = None  # run every step, as eos_token_id=[] for minipeft
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    enc, ref_enc = ours.prompt_encoder["default"], ref.prompt_encoder["default"]
    if "prompt_tuning_init" in c["kw"]:  # the text's token embeddings, repeated or cut to P
        torch.testing.assert_close(enc.embedding.weight, ref_enc.embedding.weight, atol=0, rtol=0)
    with torch.no_grad():  # trained-looking: the init moved by a random step
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ref_enc.load_state_dict(enc.state_dict())  # same names: embedding.weight, transform.{0,2}.*

    ids, left_mask = padded_batch(T=c["T"], vocab=vocab, seed=c["i"])
    ids = ids.masked_fill(left_mask == 0, 0)
    batches = {"full": (ids, torch.ones_like(ids)), "left": (ids, left_mask)}
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_forward(ref, c, ids, torch.ones_like(ids))[1], atol=ATOL, rtol=0)
    g = torch.Generator().manual_seed(c["i"])
    for name, (x, mask) in batches.items():
        # -100 on pads and drawn positions, and on each row's first real token: it is read from a pad's
        # (meaningless) output in a left-padded row, and from the last virtual token in peft's prompt tuning
        # (test_peft_prompt_tuning_scores_the_first_label), which minipeft's logits (B, T, V) leave out.
        first = mask.cumsum(-1) == 1
        labels = x.masked_fill((mask == 0) | first | (torch.rand(x.shape, generator=g) < 0.3), -100)
        ours.zero_grad(), ref.zero_grad()
        logits = our_forward(ours, c, x, mask)
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        out, ref_logits = peft_forward(ref, c, x, mask, labels=labels)
        out.loss.backward()
        real = mask.bool()  # outputs at pads are meaningless in both
        torch.testing.assert_close(logits[real], ref_logits[real], atol=ATOL, rtol=0, msg=name)
        torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        ref_grads = dict(ref_enc.named_parameters())
        for pname, p in enc.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[pname].grad, **GRAD_TOL, msg=f"{name}: {pname}")
        check_generation(ours, ref, c, x, mask)

    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    ours_json, ref_json = (json.loads((tmp_path / s / "adapter_config.json").read_text()) for s in ("ours", "peft"))
    assert set(ref_json) - set(ours_json) == PEFT_ONLY_FIELDS and set(ours_json) <= set(ref_json)
    assert {k: ours_json[k] for k in ours_json} == {k: ref_json[k] for k in ours_json}
    table, ref_table = (load_file(tmp_path / s / "adapter_model.safetensors") for s in ("ours", "peft"))
    assert table.keys() == ref_table.keys() == {"prompt_embeddings"}  # a projection's MLP folded into its output
    torch.testing.assert_close(table["prompt_embeddings"], ref_table["prompt_embeddings"], atol=1e-6, rtol=0)

    # One library's files in the other (drawn): same logits as the model that saved them.
    x, mask = batches["left"]
    if c["ours_saves"]:
        loaded = peft.PeftModel.from_pretrained(to_hf(base_model(c, vocab)), tmp_path / "ours").eval()
        with torch.no_grad():
            got, want = peft_forward(loaded, c, x, mask)[1], peft_forward(ref, c, x, mask)[1]
    else:
        loaded = PeftModel.from_pretrained(base_model(c, vocab), tmp_path / "peft")
        with torch.no_grad():
            got, want = our_forward(loaded, c, x, mask), our_forward(ours, c, x, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=0)


def test_draws_cover_the_brief():
    """The seeded draws hit every combination the module docstring promises."""
    ids = [case_id(c) for c in CASES]
    assert {c["family"] for c in CASES} == {"llama-mha", "llama-gqa", "mqa", "mistral", "qwen2"}
    assert {c["tied"] for c in CASES} == {c["ours_saves"] for c in CASES} == {True, False}
    assert all(any(f"-{kind}-" in i for i in ids) for kind in ("prefix", "prefix-proj", "prompt", "prompt-text"))
    assert any(c["kw"].get("encoder_hidden_size") for c in CASES)
    assert any(c["kw"].get("prefix_projection") and c["kw"]["encoder_hidden_size"] is None for c in CASES)
    assert min(c["P"] for c in CASES) == 1 and max(c["P"] for c in CASES) >= 18


def pair(method: str):
    """minipeft's and peft's models on the same tiny LLaMA (GQA), P = 4, the same random prompt weights."""
    cls = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    ours = get_peft_model(tiny_model(), cls(num_virtual_tokens=4)).eval()
    ref = peft.get_peft_model(to_hf(tiny_model()), getattr(peft, cls.__name__)(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=4)).eval()
    ref.generation_config.eos_token_id = None
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ours.prompt_encoder.parameters():
            p.normal_(std=0.5)
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    return ours, ref


REAL = torch.tensor([[5, 17, 42, 9, 100, 3]])
PADDED, PAD_MASK = torch.cat((torch.zeros(1, 3, dtype=torch.long), REAL), 1), torch.tensor([[0, 0, 0] + [1] * 6])


def test_peft_prompt_tuning_output_depends_on_left_padding():
    """peft 0.22, prompt tuning: a row's generation depends on its left padding, since peft numbers the
    pads (position_ids dropped, forward and generate alike). Here, P = 4, the row [5, 17, 42, 9, 100, 3]
    alone and after 3 pads: peft's 3 greedy steps' logits differ by 2.9e-3 (same ids here); minipeft's
    are the same padded or not, and equal peft's on the unpadded row. Prefix tuning: peft's generate
    numbers real tokens only (padding changes nothing, 9e-8), but its forward without position_ids
    numbers pads (2.2e-2 from its own generate), as transformers' forward does."""
    for method in ("prefix", "prompt"):
        ours, ref = pair(method)
        seq_pad, steps_pad = peft_generate(ref, PADDED, PAD_MASK, 3)
        seq, steps = peft_generate(ref, REAL, torch.ones_like(REAL), 3)
        assert torch.equal(seq_pad[:, 3:], seq)
        mask = torch.cat((PAD_MASK, torch.ones(1, 3, dtype=torch.long)), 1)
        with torch.no_grad():
            ours_pad, ours_real = ours(seq_pad, attention_mask=mask)[:, -4:-1], ours(seq)[:, -4:-1]
            forward_pad = ref(seq_pad, attention_mask=mask).logits[:, -4:-1]
        torch.testing.assert_close(ours_pad, ours_real, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours_real, steps, atol=ATOL, rtol=0)
        def moved(d):
            return bool(d.abs().max() > 1e-3)
        if method == "prefix":
            assert not moved(steps_pad - steps) and moved(forward_pad - steps_pad)
        else:  # peft's forward and generate agree with each other, not with the unpadded row
            torch.testing.assert_close(forward_pad, steps_pad, atol=ATOL, rtol=0)
            assert moved(steps_pad - steps)
        assert torch.equal(ours.generate(PADDED, 3, attention_mask=PAD_MASK, eos_token_id=[]), seq_pad)


def test_peft_prompt_tuning_scores_the_first_label():
    """peft's prompt-tuning loss scores labels[:, 0] too, predicted by the last virtual token (its logits
    are (B, P+T, V), labels padded with P -100 in front); minipeft's logits are the real tokens' (B, T, V),
    so a loss over them cannot. peft's loss = (minipeft's summed NLL + that one term) / (N + 1)."""
    ours, ref = pair("prompt")
    out = ref(REAL, labels=REAL)
    with torch.no_grad():
        ours_sum = causal_lm_loss(ours(REAL), REAL, reduction="sum")
        first = torch.nn.functional.cross_entropy(out.logits[:, 3], REAL[:, 0], reduction="sum")  # virtual P-1
    torch.testing.assert_close(out.loss, (ours_sum + first) / REAL.shape[1], atol=ATOL, rtol=0)
    assert abs(out.loss - ours_sum / (REAL.shape[1] - 1)) > 1e-2

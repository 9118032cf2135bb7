"""A seeded randomized parity test of minipeft's LoRA against Hugging Face PEFT 0.22 (test-only).

Each of CASES configs is drawn from Random(case): the family (Qwen2, biased and tied, whenever bias is
not "none"), r in 1..16, lora_alpha (below r, non-integer), rsLoRA, init_lora_weights, lora_dropout,
target_modules as a list (with embed_tokens / lm_head sometimes), a regex or "all-linear",
layers_to_transform, exclude_modules, rank_pattern / alpha_pattern, modules_to_save, a float32 or a
bfloat16 base. For each, on the same tiny random model in both libraries:

- with the same torch seed, the same initial adapter, draw for draw (on a bfloat16 base PEFT rounds its
  float32 draws to bfloat16: compared so), and the same trainable names, shapes and counts;
- with the same random adapter (B != 0, so the adapter shows), the same logits (eval: dropout off; in
  train mode the two draw different masks) and the same gradients of a loss for every trainable tensor;
- the same LoRA-wrapped modules; minipeft's files load in PEFT, and PEFT's in minipeft, to the same logits
  (and, loaded trainable, the same counts); PEFT reads minipeft's adapter_config.json as the config it was
  given (but "all-linear", which PEFT saves as the names it stands for);
- merge_and_unload() gives the same logits (except LoRA on a tied lm_head / embed_tokens, where PEFT's
  merge moves the shared tensor: there minipeft's merged model is held to its unmerged logits).
A config PEFT refuses (exclude_modules excluding everything, ...) must be refused here too.
"""
from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import peft

from minipeft.lora import LoraConfig, LoraLayer
from minipeft.peft_model import PeftModel, get_peft_model
from conftest import tiny_model, to_hf

CASES = 30
IDS = torch.randint(0, 131, (2, 7), generator=torch.Generator().manual_seed(0))
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Relative to each tensor's largest entry (rel_err). float32, the same maths in both summed in other orders
# (SDPA vs eager attention, merged vs factored LoRA): observed <= 6e-7 (logits, merged logits) and <= 1.7e-6
# (gradients) on these draws.
FP32 = 1e-5
# bfloat16 base, float32 adapters in both: each library rounds its 16-bit activations in other places (SDPA vs
# eager attention, RMSNorm's cast; one bfloat16 step is 2^-8 = 3.9e-3 relative). The bare bases already differ
# by <= 6e-3 here; with the adapter observed <= 9.5e-3 (logits), 7.4e-3 (merged), 1.8e-2 (gradients).
BF16 = 4e-2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small models run faster on one thread


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the scale max |b|: one number per tensor, however small its entries."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def draw(case: int) -> tuple[str, torch.dtype, dict]:
    """Case `case`'s (family, base dtype, LoraConfig fields)."""
    rng = random.Random(case)
    bias = ("none", "all", "lora_only")[case % 3]
    family = "qwen2" if bias != "none" else rng.choice(["llama-gqa", "llama-mha", "qwen2"])
    dtype = torch.bfloat16 if case % 4 == 3 else torch.float32
    r = rng.randint(1, 16)
    cfg = dict(r=r, lora_alpha=rng.choice([r / 2, r, 2 * r, round(rng.uniform(0.3, 40), 3)]),
               use_rslora=rng.random() < 0.3, init_lora_weights=rng.choice([True, "gaussian", False]),
               lora_dropout=rng.choice([0.0, 0.0, 0.1, 0.3]), bias=bias)
    names = rng.sample(LINEAR, rng.randint(1, 4))
    form = ("list", "regex", "all-linear")[(case // 3) % 3]
    if form == "list":
        cfg["target_modules"] = names + [e for e in ("embed_tokens", "lm_head") if rng.random() < 0.3]
        if rng.random() < 0.4:
            cfg["layers_to_transform"] = rng.choice([0, 1, [0], [1], [0, 1]])
    elif form == "regex":
        layer = rng.choice([r"\d+", "0", "1"])
        cfg["target_modules"] = rf".*layers\.{layer}\..*\.({'|'.join(names)})" + ("|.*embed_tokens" if
                                                                                 rng.random() < 0.3 else "")
    else:
        cfg["target_modules"] = "all-linear"
    if rng.random() < 0.3:
        cfg["exclude_modules"] = rng.choice([[rng.choice(LINEAR)], r".*layers\.0\.self_attn\..*",
                                             [f"model.layers.1.mlp.{rng.choice(LINEAR[4:])}"]])
    if rng.random() < 0.35:
        cfg["rank_pattern"] = {rng.choice(LINEAR): rng.randint(1, 16), r"layers\.1\.self_attn\.v_proj": 3}
    if rng.random() < 0.35:
        cfg["alpha_pattern"] = {rng.choice(LINEAR): round(rng.uniform(0.5, 20), 2)}
    if rng.random() < 0.3:
        cfg["modules_to_save"] = [rng.choice(["lm_head", "embed_tokens", "norm"])]
    return family, dtype, cfg


def quietly(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings, "no modules were excluded": compared elsewhere
        return make()


def base(family: str, dtype: torch.dtype, hf: bool):
    model = tiny_model(family).to(dtype)
    return to_hf(model) if hf else model


def peft_name(name: str) -> str:
    return name.replace("base_model.", "base_model.model.", 1)  # PEFT nests the causal LM once more


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def logits(model, ids=IDS) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss(out: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of IDS, in float32."""
    return F.cross_entropy(out[:, :-1].float().flatten(0, 1), IDS[:, 1:].flatten())


@pytest.mark.parametrize("case", range(CASES))
def test_random_lora_config_equals_peft(case, tmp_path):
    family, dtype, cfg = draw(case)
    tol = BF16 if dtype == torch.bfloat16 else FP32
    where = f"case {case}: {family} {dtype} {cfg}"
    ours_base, ref_base = base(family, dtype, False), base(family, dtype, True)
    try:
        torch.manual_seed(case)
        ref = quietly(lambda: peft.get_peft_model(ref_base, peft.LoraConfig(task_type="CAUSAL_LM", **cfg)))
    except ValueError as refused:  # PEFT refuses it: so must minipeft
        with pytest.raises(ValueError):
            quietly(lambda: get_peft_model(ours_base, LoraConfig(**cfg)))
        pytest.skip(f"refused by both: {refused}")
    torch.manual_seed(case)
    ours = quietly(lambda: get_peft_model(ours_base, LoraConfig(**cfg)))

    # the same trainable tensors, initialised with the same draws
    params, ref_params = trainable(ours), dict(ref.named_parameters())
    assert sorted(map(peft_name, params)) == sorted(trainable(ref)), where
    lora_layers = sorted(n for n, m in ours.tuner_layers() if isinstance(m, LoraLayer))
    assert lora_layers == sorted(ref.targeted_module_names), where
    for name, p in params.items():
        # PEFT builds the adapters in the base's dtype and casts them to float32 after: its draws rounded
        assert torch.equal(p.to(dtype).float(), ref_params[peft_name(name)].float()), f"{where}: init of {name}"
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters(), where

    # the same random adapter, then logits and the loss's gradients (eval: no dropout mask to share)
    gen = torch.Generator().manual_seed(case)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            ref_params[peft_name(name)].copy_(p)
    ours.eval(), ref.eval()
    out, ref_out = logits(ours), logits(ref)
    assert rel_err(out, ref_out) <= tol, f"{where}: logits {rel_err(out, ref_out):.3g}"
    assert rel_err(out, logits(base(family, dtype, False))) > 1e-3, f"{where}: the adapter does not show"
    loss(out).backward()
    loss(ref_out).backward()
    for name, p in params.items():
        grad, ref_grad = p.grad, ref_params[peft_name(name)].grad
        assert (grad is None) == (ref_grad is None), f"{where}: {name} gradient"
        if grad is not None:
            err = rel_err(grad, ref_grad)
            assert err <= tol, f"{where}: gradient of {name} {err:.3g}"

    # files both ways
    ours.save_pretrained(tmp_path / "ours")
    quietly(lambda: ref.save_pretrained(tmp_path / "ref"))
    in_peft = quietly(lambda: peft.PeftModel.from_pretrained(base(family, dtype, True), tmp_path / "ours")).eval()
    in_ours = quietly(lambda: PeftModel.from_pretrained(base(family, dtype, False), tmp_path / "ref"))
    with torch.no_grad():
        assert rel_err(logits(in_peft), out) <= tol, f"{where}: minipeft's file in PEFT"
        assert rel_err(logits(in_ours), ref_out) <= tol, f"{where}: PEFT's file in minipeft"
    trainable_again = quietly(lambda: PeftModel.from_pretrained(base(family, dtype, False), tmp_path / "ref",
                                                                is_trainable=True))
    assert trainable_again.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters(), where
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_written = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    provenance = {"peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
    if cfg["target_modules"] == "all-linear":
        # PEFT saves the module names "all-linear" stands for, minipeft "all-linear" itself (a continued job compares
        # its own target_modules with the file's: job.check_continuation): both files load to the same modules
        provenance.add("target_modules")
    for key in sorted(written.keys() & ref_written.keys() - provenance):
        mine, theirs = written[key], ref_written[key]
        if key in ("target_modules", "modules_to_save", "exclude_modules") and isinstance(theirs, list):
            mine, theirs = sorted(mine), sorted(theirs)  # PEFT writes a set
        assert mine == theirs, f"{where}: adapter_config.json {key}: {mine!r} vs PEFT's {theirs!r}"
    read_by_peft = peft.LoraConfig.from_pretrained(str(tmp_path / "ours")).to_dict()
    given = ref.peft_config["default"].to_dict()
    for key in given.keys() - provenance:
        mine, theirs = read_by_peft.get(key), given[key]
        if isinstance(theirs, (set, list)):
            mine, theirs = sorted(mine or []), sorted(theirs)
        assert mine == theirs, f"{where}: PEFT reads {key}={mine!r} from minipeft's file, was given {theirs!r}"

    # merge_and_unload
    tied_lora = family == "qwen2" and any(n.endswith(("lm_head", "embed_tokens")) for n, _ in ours.tuner_layers()
                                          if hasattr(ours.base_model.get_submodule(n), "scaling"))
    with torch.no_grad():
        merged = logits(ours.merge_and_unload())
        expected = out if tied_lora else logits(quietly(ref.merge_and_unload))
        assert rel_err(merged, expected) <= tol, f"{where}: merged"


# --- the divergences the fuzz found, each as its minimal case ---

def test_a_seed_gives_peft_initial_adapter_for_every_init():
    """init_lora_weights=False drew A and B again over nn.Linear's init (PEFT keeps that one), and an
    embedding's B was drawn once (PEFT draws A and B N(0, 1) at creation, then B again): with one seed,
    other initial adapters than PEFT's. Now the same draws, for Linear and Embedding, every init."""
    for init in (True, "gaussian", False):
        cfg = dict(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init)
        ours_base, ref_base = tiny_model(), to_hf(tiny_model())
        torch.manual_seed(0)
        ours = get_peft_model(ours_base, LoraConfig(**cfg))
        torch.manual_seed(0)
        ref = dict(peft.get_peft_model(ref_base, peft.LoraConfig(**cfg)).named_parameters())
        for name, p in trainable(ours).items():
            assert torch.equal(p, ref[peft_name(name)]), (init, name)


def test_rank_pattern_keeps_its_key_order_in_the_file(tmp_path):
    """The first matching rank_pattern key wins, so the order of its keys is part of its meaning; the
    config was written with sort_keys, which reordered them: PEFT then built layer 1's v_proj at rank 3 and
    could not load the rank-11 tensors ("size mismatch"). Now the fields are sorted, their insides kept."""
    cfg = dict(r=4, target_modules=["v_proj"], rank_pattern={"v_proj": 11, r"layers\.1\.self_attn\.v_proj": 3})
    get_peft_model(tiny_model(), LoraConfig(**cfg)).save_pretrained(tmp_path)
    in_peft = peft.PeftModel.from_pretrained(to_hf(tiny_model()), tmp_path)
    assert in_peft.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight.shape == (11, 64)
    assert list(PeftModel.from_pretrained(tiny_model(), tmp_path).peft_config["default"].rank_pattern) == \
        list(cfg["rank_pattern"])

"""The serving loop (minipeft.platform.inference) against minipeft.generation.generate, in process:
for every adapter kind a deployment can hold, the streamed token ids equal generate()'s, greedy and
seeded sampling alike, with presence and frequency penalties too, also when requests for different
adapters interleave step by step. The pool: an adapter that fails to load leaves the loaded model
and its other adapters as they were, and a model goes when its last deployment does."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from minipeft import load_pretrained
from minipeft.adapter import AdapterConfig
from minipeft.generation import generate
from minipeft.lora import LoraConfig
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.platform.errors import ApiError
from minipeft.platform.inference import ModelPool, Sampling, Target, stream_tokens
from minipeft.platform.openai_api import CompletionRequest, _sampling
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
from minipeft.templates import get_template, save_template
from conftest import save_tiny_base

METHODS = {"lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
           "adapter": lambda: AdapterConfig(bottleneck_size=8),
           "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
           "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3)}
PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("serve") / "base", hidden_size=48, intermediate_size=96,
                          tie_word_embeddings=False)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Each method's adapter with random weights (a fresh LoRA's B = 0 would change nothing)."""
    out = {}
    for i, (name, make) in enumerate(METHODS.items()):
        torch.manual_seed(i)
        model = get_peft_model(load_pretrained(base), make())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
        save_template(out[name], get_template("plain"))
    return out


def expected(base, adapter_dir, sampling, stops):
    model = PeftModel.from_pretrained(load_pretrained(base), adapter_dir).eval()
    generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
    out = generate(model, torch.tensor([PROMPT]), sampling.max_tokens, temperature=sampling.temperature,
                   top_p=sampling.top_p, eos_token_id=stops or None, generator=generator,
                   presence_penalty=sampling.presence_penalty,
                   frequency_penalty=sampling.frequency_penalty)[0, len(PROMPT):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), None)
    return out if cut is None else out[:cut]


@pytest.mark.parametrize("sampling", [Sampling(12), Sampling(12, temperature=0.9, top_p=0.8, seed=3),
                                      Sampling(12, presence_penalty=-1.0, frequency_penalty=0.4),
                                      Sampling(12, temperature=0.9, top_p=0.8, seed=3, presence_penalty=-2.0,
                                               frequency_penalty=0.5)],
                         ids=["greedy", "seeded-sampling", "greedy-penalties", "seeded-sampling-penalties"])
def test_streamed_tokens_equal_generate_for_every_adapter_kind(base, adapters, sampling):
    pool = ModelPool()
    served = {name: pool.get(Target(name, base, folder)) for name, folder in adapters.items()}
    stops = [served["lora"][0].tokenizer.eos_id]
    streams = {name: stream_tokens(loaded, adapter, PROMPT, sampling, stops)
               for name, (loaded, adapter, _) in served.items()}
    got = {name: [] for name in streams}
    for _ in range(sampling.max_tokens):  # round-robin: the requests interleave step by step
        for name, stream in streams.items():
            token = next(stream, None)
            if token is not None:
                got[name].append(token)
    for name, folder in adapters.items():
        assert got[name] == expected(base, folder, sampling, stops), name
    if sampling.temperature == 0:  # the comparison above means something only if the adapters differ
        assert len({tuple(tokens) for tokens in got.values()}) == len(got), "each adapter answers differently"
    if sampling.presence_penalty or sampling.frequency_penalty:  # ... and with penalties, if they matter
        plain = replace(sampling, presence_penalty=0.0, frequency_penalty=0.0)
        assert any(got[name] != expected(base, folder, plain, stops) for name, folder in adapters.items())


def test_deployments_of_one_kind_share_the_loaded_base(base, adapters):
    pool = ModelPool()
    a, b = pool.get(Target("a", base, adapters["lora"])), pool.get(Target("b", base, adapters["lora"]))
    assert a[0] is b[0] and pool.get(Target("c", base, adapters["prefix"]))[0] is not a[0]
    pool.remove("a")
    assert "a" not in b[0].model.peft_config and list(stream_tokens(b[0], "b", PROMPT, Sampling(2), []))


def test_an_adapter_that_fails_to_load_leaves_the_others_loaded(base, adapters, tmp_path):
    """A broken adapter (weights of another shape than its config says) dropped the whole loaded
    model, and with it every other deployment's adapter, to be loaded again from disk."""
    broken = tmp_path / "broken"
    shutil.copytree(adapters["lora"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    pool = ModelPool()
    with pytest.raises(ValueError, match="shape"):
        pool.get(Target("bad", base, broken))
    assert not pool._loaded, "a base loaded for it alone is not kept"
    loaded, _, _ = pool.get(Target("a", base, adapters["lora"]))
    with pytest.raises(ValueError, match="shape"):
        pool.get(Target("bad", base, broken))
    again, _, _ = pool.get(Target("a", base, adapters["lora"]))
    assert again is loaded and "bad" not in loaded.model.peft_config and "bad" not in loaded.templates
    assert pool.get(Target("b", base, adapters["lora"]))[0] is loaded  # the next adapter joins it
    reference = PeftModel.from_pretrained(load_pretrained(base), adapters["lora"]).eval()
    with torch.no_grad():
        expected = generate(reference, torch.tensor([PROMPT]), 4)[0, len(PROMPT):].tolist()
    assert list(stream_tokens(loaded, "a", PROMPT, Sampling(4), [])) == expected


def test_a_broken_chat_template_leaves_no_adapter_behind(base, adapters, tmp_path):
    """The template was read after the adapter was attached: its error left the adapter in the
    model under the deployment's name, and every later try failed with "already exists"."""
    broken = tmp_path / "broken"
    shutil.copytree(adapters["lora"], broken)
    (broken / "chat_template.json").write_text("{not json")
    pool = ModelPool()
    loaded, _, _ = pool.get(Target("a", base, adapters["lora"]))
    with pytest.raises(ValueError):
        pool.get(Target("bad", base, broken))
    assert "bad" not in loaded.model.peft_config
    shutil.copy(adapters["lora"] / "chat_template.json", broken / "chat_template.json")
    assert pool.get(Target("bad", base, broken))[0] is loaded  # repaired: it loads, into the same model


def test_removing_the_last_name_of_a_model_without_adapter_unloads_it(base, adapters):
    """A deployment of a full fine-tune has no adapter: removing it kept its model loaded for good
    (only adapters were looked for), so every undeployed full model held its memory until restart."""
    pool = ModelPool()
    full = pool.get(Target("x", base))[0]
    assert pool.get(Target("y", base))[0] is full  # a second deployment of the same weights
    pool.remove("x")
    assert pool.get(Target("y", base))[0] is full, "still used by y"
    pool.remove("y")
    assert not pool._loaded


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_the_room_of_a_request_counts_its_adapters_virtual_tokens(base, adapters, kind):
    """Prefix/prompt tuning puts num_virtual_tokens (3) before the request's tokens, whose positions
    follow them: a prompt + reply that fits the bare context overflows it by 3 with the adapter."""
    loaded, adapter, _ = ModelPool().get(Target(kind, base, adapters[kind]))
    context, virtual = loaded.context, loaded.virtual_tokens(adapter)
    assert virtual == 3 and loaded.virtual_tokens(None) == 0
    request = CompletionRequest(model=kind, prompt="x", max_tokens=context - 10)
    assert _sampling(request, 10, context, 0, limit=10**6).max_tokens == context - 10  # the bare model: it fits
    with pytest.raises(ApiError, match=f"context of {context} tokens after 3 virtual tokens; lower max_tokens "
                                       f"to {context - 13} or less"):
        _sampling(request, 10, context, virtual, limit=10**6)
    unasked = CompletionRequest(model=kind, prompt="x")  # the default reply fills the room that is left
    assert _sampling(unasked, 10, context, virtual, limit=10**6).max_tokens == context - 13

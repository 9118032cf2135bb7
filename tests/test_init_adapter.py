"""TrainConfig.init_adapter: a job that continues a saved adapter starts from its weights (the
platform's "continue training a fine-tuned model"), and a mismatched one is refused."""
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from minipeft.adapter import AdapterConfig
from minipeft.checkpoint import load_pretrained
from minipeft.job import attach_method, check_job, continue_from, run_job
from minipeft.lora import LoraConfig
from minipeft.peft_config import PeftConfig
from minipeft.peft_model import PeftModel, get_peft_model
from minipeft.prompt_learning import PrefixTuningConfig
from test_job import base_dir, data_file, job_config  # noqa: F401  (fixtures)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small models run faster on one thread


@pytest.fixture(scope="module")
def first_adapter(base_dir, data_file, tmp_path_factory):
    job = run_job(job_config(base_dir, data_file, tmp_path_factory.mktemp("first") / "job", lora_rank=4,
                             learning_rate=5e-2))
    return job.output_dir / "adapter"


def test_a_continued_job_starts_from_the_saved_adapter(base_dir, data_file, first_adapter, tmp_path):
    saved = load_file(str(first_adapter / "adapter_model.safetensors"))
    # A fresh LoRA starts with B = 0; this one was trained away from it.
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 1e-3
    # With lr 1e-12, each AdamW step moves a weight by about lr (Adam's step is normalized to ~1,
    # weight decay adds lr * 0.01 * |w|): over 7 steps far below 1e-9. So the continued adapter
    # must still equal the saved one; had it started fresh, its B would be ~0 instead.
    job = run_job(job_config(base_dir, data_file, tmp_path / "continued", lora_rank=4, learning_rate=1e-12,
                             init_adapter=str(first_adapter)))
    continued = load_file(str(job.output_dir / "adapter" / "adapter_model.safetensors"))
    assert continued.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(continued[key], saved[key], atol=1e-9, rtol=0)


def test_a_full_fine_tune_is_refused_an_adapter(base_dir, data_file, first_adapter, tmp_path):
    with pytest.raises(ValueError, match="continues a PEFT method"):
        run_job(job_config(base_dir, data_file, tmp_path / "full", method="full", init_adapter=str(first_adapter)))


def test_a_continued_lora_keeps_the_adapters_method_block(base_dir, data_file, first_adapter, tmp_path,
                                                         monkeypatch):
    """lora_alpha and use_rslora are not in the weights but scale them (B A * lora_alpha / r, or
    / sqrt(r)): continuing with another value changed the saved adapter's function silently.
    lora_dropout is held to the adapter's too, as the platform does. Another rank or target_modules
    was found out only after the model loaded, as tensor shapes or names. Each is refused before the
    model loads, naming the setting and the adapter's file."""
    from minipeft import job

    saved = json.loads((first_adapter / "adapter_config.json").read_text())
    monkeypatch.setattr(job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    where = f"init_adapter {first_adapter / 'adapter_config.json'}: "
    for key, field, value in (("lora_alpha", "lora_alpha", 16.0), ("lora_dropout", "lora_dropout", 0.0),
                              ("use_rslora", "use_rslora", True), ("lora_rank", "r", 8),
                              ("target_modules", "target_modules", ["q_proj", "k_proj", "v_proj"])):
        assert saved[field] != value
        message = f"{where}{key}={value!r} but the adapter has {field}={saved[field]!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            run_job(job_config(base_dir, data_file, tmp_path / key, **{"lora_rank": 4, key: value},
                               init_adapter=str(first_adapter)))
    # target_modules in another order is the same set (PEFT writes it from a set)
    check_job(job_config(base_dir, data_file, tmp_path / "job", lora_rank=4, target_modules=["v_proj", "q_proj"],
                         init_adapter=str(first_adapter)))
    assert list(tmp_path.iterdir()) == []


def test_a_lora_with_per_module_ranks_continues(base_dir, data_file, tmp_path):
    """An adapter whose r and lora_alpha vary by module (rank_pattern, alpha_pattern) in some layers only
    (layers_to_transform): a job sets none of these, and rebuilt the adapter from its r alone, so the
    v_proj tensors of rank 8 failed the shape check. It is rebuilt from its own config, its method block
    (r, lora_alpha, ...) matching the job's, and continues from its weights with its scaling."""
    config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 4}, layers_to_transform=[1])
    model = get_peft_model(load_pretrained(base_dir), config)
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking B (a fresh one is 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(tmp_path / "first")
    saved = load_file(str(tmp_path / "first" / "adapter_model.safetensors"))
    assert {tuple(v.shape) for k, v in saved.items() if "v_proj.lora_A" in k} == {(8, 64)}
    # lr 1e-12: the weights stay the saved ones (test_a_continued_job_starts_from_the_saved_adapter)
    job = run_job(job_config(base_dir, data_file, tmp_path / "continued", lora_rank=4, learning_rate=1e-12,
                             max_steps=2, init_adapter=str(tmp_path / "first")))
    continued = load_file(str(job.output_dir / "adapter" / "adapter_model.safetensors"))
    assert continued.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(continued[key], saved[key], atol=1e-9, rtol=0)
    ours = PeftConfig.load(job.output_dir / "adapter")
    assert (ours.rank_pattern, ours.alpha_pattern, ours.layers_to_transform) == ({"v_proj": 8}, {"v_proj": 4}, [1])


SAVED = {  # adapters with settings no job can give, and the job block that continues each
    "adapter": (AdapterConfig(bottleneck_size=8, placement="pfeiffer", activation="gelu"),
                dict(method="adapter", bottleneck_size=8, adapter_placement="pfeiffer")),
    "adapter-reduction-factor": (AdapterConfig(reduction_factor=8, activation="tanh"), dict(method="adapter")),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
               dict(method="prefix", num_virtual_tokens=3)),
}


def saved_adapter(base_dir, config, folder):
    """`config` attached to the base with random weights (a fresh adapter is a no-op), saved in folder."""
    model = get_peft_model(load_pretrained(base_dir), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", sorted(SAVED))
def test_a_continued_adapter_computes_what_the_saved_one_did(base_dir, data_file, tmp_path, case):
    """A bottleneck adapter was rebuilt from the job's block alone: a GELU or tanh one continued with ReLU
    (and a reduction_factor one with the job's bottleneck_size) whenever the shapes matched, computing another
    function from the same weights. Each is rebuilt from its own config: before the first step, the continued
    model's logits are the saved adapter's, and its config is the saved one. (Prefix tuning computed the same
    before: its file holds the projection's output table, which loads with the MLP folded away; but its config
    lost prefix_projection and encoder_hidden_size.)"""
    config, block = SAVED[case]
    folder = saved_adapter(base_dir, config, tmp_path / "first")
    cfg = job_config(base_dir, data_file, tmp_path / "job", init_adapter=str(folder), **block)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        continued = attach_method(load_pretrained(base_dir), cfg)
    unset = [str(w.message) for w in caught if "not used" in str(w.message)]
    assert unset == (["init_adapter " + str(folder / "adapter_config.json") + ": bottleneck_size=64 not used: the "
                      "adapter leaves it unset and is continued as its adapter_config.json says"]
                     if case == "adapter-reduction-factor" else [])
    continue_from(continued, str(folder))
    reference = PeftModel.from_pretrained(load_pretrained(base_dir), folder)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(continued.eval()(ids), reference.eval()(ids), atol=0, rtol=0)
    assert PeftConfig.load(folder).to_dict() == {**continued.peft_config["default"].to_dict(),
                                                 "base_model_name_or_path": None}


def test_a_continued_adapter_keeps_the_job_block(base_dir, data_file, tmp_path, monkeypatch):
    """bottleneck_size, adapter_placement and num_virtual_tokens were found out only after the model loaded (a
    placement as every missing and unexpected tensor name): each is refused first, naming the setting."""
    from minipeft import job

    adapter = saved_adapter(base_dir, SAVED["adapter"][0], tmp_path / "adapter")
    prefix = saved_adapter(base_dir, SAVED["prefix"][0], tmp_path / "prefix")
    monkeypatch.setattr(job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for folder, block, message in (
            (adapter, dict(method="adapter", bottleneck_size=16, adapter_placement="pfeiffer"),
             "bottleneck_size=16 but the adapter has bottleneck_size=8"),
            (adapter, dict(method="adapter", bottleneck_size=8),
             "adapter_placement='houlsby' but the adapter has placement='pfeiffer'"),
            (prefix, dict(method="prefix", num_virtual_tokens=4),
             "num_virtual_tokens=4 but the adapter has num_virtual_tokens=3")):
        with pytest.raises(ValueError, match=re.escape(f"init_adapter {folder / 'adapter_config.json'}: {message}")):
            run_job(job_config(base_dir, data_file, tmp_path / "job", init_adapter=str(folder), **block))

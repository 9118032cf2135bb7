"""TrainConfig.init_adapter: a job that continues a saved adapter starts from its weights (the
platform's "continue training a fine-tuned model"), and a mismatched one is refused."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from minipeft.job import run_job
from test_job import base_dir, data_file, job_config  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: two torch threads contend with other processes and run ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_a_mismatched_adapter_is_refused(base_dir, data_file, first_adapter, tmp_path):
    with pytest.raises(ValueError, match="adapter_model.safetensors: shape mismatches"):  # rank 8 != the saved rank 4
        run_job(job_config(base_dir, data_file, tmp_path / "rank", lora_rank=8, init_adapter=str(first_adapter)))
    with pytest.raises(ValueError, match="continues a PEFT method"):
        run_job(job_config(base_dir, data_file, tmp_path / "full", method="full", init_adapter=str(first_adapter)))


def test_a_continued_lora_keeps_the_adapters_alpha_and_dropout(base_dir, data_file, first_adapter, tmp_path,
                                                             monkeypatch):
    """lora_alpha and use_rslora are not in the weights but scale them (B A * lora_alpha / r, or
    / sqrt(r)): continuing with another value changed the saved adapter's function silently.
    lora_dropout is held to the adapter's too, as the platform does. Each is refused before the
    model loads, naming the adapter's file."""
    from minipeft import job

    saved = json.loads((first_adapter / "adapter_config.json").read_text())
    monkeypatch.setattr(job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    where = f"init_adapter {first_adapter / 'adapter_config.json'}: "
    for key, value in (("lora_alpha", 16.0), ("lora_dropout", 0.0), ("use_rslora", True)):
        assert saved[key] != value
        with pytest.raises(ValueError, match=re.escape(f"{where}{key}={value} but the adapter has {key}={saved[key]}")):
            run_job(job_config(base_dir, data_file, tmp_path / key, lora_rank=4, init_adapter=str(first_adapter),
                               **{key: value}))
    assert list(tmp_path.iterdir()) == []

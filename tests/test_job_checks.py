"""Job mistakes that used to train silently, or to fail only after the model had loaded (minutes on a
real model), and a loss curve that drew nothing: each is now refused early, by name, or drawn."""
import json
import re

import numpy as np
import pytest

from minipeft import job
from minipeft.adapter import AdapterConfig
from minipeft.data import DataError
from minipeft.plots import plot_curves
from minipeft.prompt_learning import PrefixTuningConfig
from test_job import base_dir, data_file, job_config  # noqa: F401  (fixtures)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: these jobs must be refused before it."""
    monkeypatch.setattr(job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_count_against_the_models_context(method, base_dir, data_file, tmp_path, no_model_load):
    """Prefix and prompt tuning put num_virtual_tokens positions before the real tokens (their
    positions start at P): max_length 64 + 8 virtual tokens on a 64-position model trained the last
    tokens past the context, silently. Only the model's config.json is needed to say so."""
    small = tmp_path / "small"
    small.mkdir()
    config = json.loads((base_dir / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    with pytest.raises(ValueError, match=re.escape(
            f"max_length=64 + num_virtual_tokens=8 exceeds the model's context: {small / 'config.json'} has "
            "max_position_embeddings=64; use max_length <= 56")):
        job.run_job(job_config(small, data_file, tmp_path / "job", method=method, num_virtual_tokens=8))
    job.check_job(job_config(small, data_file, tmp_path / "job", method=method, num_virtual_tokens=8, max_length=56))
    job.check_job(job_config(small, data_file, tmp_path / "job", max_length=64))  # LoRA adds no position
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_an_init_adapter_of_another_kind_is_refused_before_the_model_loads(base_dir, data_file, tmp_path,
                                                                           no_model_load):
    """A prefix adapter given to a LoRA job (or a missing one to an adapter job) was found out only
    after the model loaded: as a list of every missing and unexpected tensor name, or a missing
    file. The adapter's kind is in its adapter_config.json; so is whether there is one."""
    prefix = tmp_path / "prefix"
    PrefixTuningConfig(num_virtual_tokens=4).save(prefix.mkdir() or prefix)
    where = f"init_adapter {prefix / 'adapter_config.json'}: "
    with pytest.raises(ValueError, match=re.escape(f"{where}a PREFIX_TUNING adapter, but method='lora' trains LORA")):
        job.run_job(job_config(base_dir, data_file, tmp_path / "job", init_adapter=str(prefix)))
    with pytest.raises(ValueError, match=re.escape(f"{where}a PREFIX_TUNING adapter, but method='adapter' trains "
                                                   "BOTTLENECK_ADAPTER")):
        job.run_job(job_config(base_dir, data_file, tmp_path / "job", method="adapter", init_adapter=str(prefix)))
    with pytest.raises(ValueError, match="continues a PEFT method; to continue a full fine-tune"):
        job.run_job(job_config(base_dir, data_file, tmp_path / "job", method="full", init_adapter=str(prefix)))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope" / "adapter_config.json"))):
        job.run_job(job_config(base_dir, data_file, tmp_path / "job", method="adapter",
                               init_adapter=str(tmp_path / "nope")))
    adapter = tmp_path / "adapter"
    AdapterConfig(bottleneck_size=8).save(adapter.mkdir() or adapter)
    job.check_job(job_config(base_dir, data_file, tmp_path / "job", method="adapter", bottleneck_size=8,
                             init_adapter=str(adapter)))  # its own kind passes (shapes: continue_from)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "prefix"]


def test_data_that_cannot_train_is_refused_before_the_model_loads(base_dir, data_file, tmp_path, no_model_load):
    """The data were read only after the model had loaded: a file too small to hold out a test
    split, a malformed line, or examples all longer than max_length waited for the weights."""
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(data_file.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match="cannot split 3 examples"):
        job.run_job(job_config(base_dir, tiny, tmp_path / "a"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        job.run_job(job_config(base_dir, bad, tmp_path / "b", test_file=str(data_file)))
    with pytest.raises(ValueError, match="no example fits max_length=8"):
        job.run_job(job_config(base_dir, data_file, tmp_path / "c", max_length=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "tiny.jsonl"]


def _pixels(png, rgb) -> int:
    """How many pixels of the image are (nearly) the colour rgb (0-255)."""
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(image - np.array(rgb) / 255).max(axis=-1) < 0.08).sum())


TRAIN_BLUE, LR_GREEN = (31, 119, 180), (44, 160, 44)  # matplotlib's tab:blue and tab:green


def test_a_loss_curve_with_one_logged_step_shows_it(tmp_path):
    """A job shorter than logging_steps logs one train row (the last step): drawn as a line alone,
    one point is no line, so the PNG showed an empty learning-rate panel and no train loss."""
    png = plot_curves([{"step": 7, "loss": 5.8, "lr": 1e-3}, {"step": 7, "eval_loss": 5.7}], tmp_path / "one.png")
    assert _pixels(png, LR_GREEN) > 20  # the lr panel has no legend: any green is the point
    eval_only = plot_curves([{"step": 7, "eval_loss": 5.7}], tmp_path / "eval.png")
    # No train rows: no "train loss" entry in the legend, for a line that is not there.
    assert _pixels(eval_only, TRAIN_BLUE) == 0
    # The legend's sample line alone is ~60 blue pixels; with the point (and a marker on the sample) ~160.
    assert _pixels(png, TRAIN_BLUE) > 100

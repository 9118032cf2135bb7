"""The job flow end to end on a tiny model and tokenizer built here: JSONL -> adapter -> merge."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from minipeft import ModelConfig, Transformer, load_pretrained
from minipeft.data import DataError
from minipeft.files import check_output_dir
from minipeft.job import load_trained, run_job
from minipeft.lora import LoraLinear
from minipeft.peft_model import PeftModel
from minipeft.train_cli import merge_checked
from minipeft.train_config import TrainConfig
from minipeft.tokenizer import CHAT_TOKENS
from conftest import save_tiny_base, train_tiny

WORDS = "apple river stone cloud light tiger paper green music window".split()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Repeat the word {a} then {b}.", "output": f"{a} {b}"}
            for a in WORDS for b in WORDS if a != b][:60]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_config(base_dir, data_file, out, **kw):
    return TrainConfig(**{"model": str(base_dir), "train_file": str(data_file), "output_dir": str(out),
                          "n_epochs": 1, "batch_size": 8, "logging_steps": 1, "learning_rate": 5e-3,
                          "max_length": 64, **kw})


def test_resuming_a_job_without_checkpoints_restarts_it_only_unchanged(base_dir, data_file, tmp_path):
    """save_strategy "no" leaves nothing to resume: --resume silently retrained, and with a changed
    config replaced the job (job_config.json included). It now says so, and refuses a change."""
    cfg = job_config(base_dir, data_file, tmp_path / "job", save_strategy="no")
    run_job(cfg)
    with pytest.raises(ValueError, match=r"cannot resume with a different config .*batch_size 8 -> 4"):
        run_job(job_config(base_dir, data_file, tmp_path / "job", save_strategy="no", batch_size=4), resume=True)
    assert json.loads((tmp_path / "job" / "job_config.json").read_text())["batch_size"] == 8
    with pytest.warns(UserWarning, match="no checkpoint to resume from .* starts again from step 0"):
        run_job(cfg, resume=True)


def test_lora_job_writes_a_complete_job_directory(base_dir, data_file, tmp_path):
    job = run_job(job_config(base_dir, data_file, tmp_path / "job"))
    out = job.output_dir
    for name in ("job_config.json", "metrics.jsonl", "loss_curve.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/chat_template.json", "adapter/tokenizer.model"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert job.result.steps == 7  # ceil(54 / 8): 60 examples less the 10% test split, batch 8
    assert 0 < job.trainable < job.total
    with pytest.raises(ValueError, match="already holds a job"):
        run_job(job_config(base_dir, data_file, out))


@pytest.mark.parametrize("method", ["qlora", "adapter", "prefix", "prompt", "full"])
def test_every_method_runs_as_a_job(method, base_dir, data_file, tmp_path):
    job = run_job(job_config(base_dir, data_file, tmp_path / method, method=method, num_virtual_tokens=4,
                             bottleneck_size=8, target_modules="all-linear"))
    assert (job.output_dir / ("model" if method == "full" else "adapter")).is_dir()
    assert job.result.eval["eval_loss"] > 0


def test_data_holding_the_tokenizers_own_special_token_is_refused(tmp_path):
    """Beyond the chat tokens: a tokenizer's added token in content would become that control token."""
    base = tmp_path / "model"
    tok = train_tiny(base, special_tokens=CHAT_TOKENS + ("<|tool|>",))
    Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)).save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "Call it.", "output": "use <|tool|> now"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: output: .*<\|tool\|>"):
        run_job(job_config(base, data, tmp_path / "job", test_file=str(data)))


def test_merge_is_checked_before_it_is_written(base_dir, data_file, tmp_path, monkeypatch):
    job = run_job(job_config(base_dir, data_file, tmp_path / "job", lora_rank=4))
    adapter = job.output_dir / "adapter"
    report = merge_checked(str(base_dir), str(adapter), str(tmp_path / "merged"), max_diff=1e-3, force=False)
    assert report["max_abs_logit_diff"] < 1e-4 and report["greedy_token_agreement"] == 1.0
    peft_model, tok = load_trained(str(base_dir), str(adapter))
    ids = torch.tensor([tok.encode("Repeat the word apple then river.", bos=True)])
    torch.testing.assert_close(load_pretrained(tmp_path / "merged")(ids), peft_model(ids), atol=1e-4, rtol=0)

    real_unloaded = LoraLinear.unloaded

    def broken(self):  # a merge bug: the update lands transposed-scaled wrong
        layer = real_unloaded(self)
        layer.weight.data.mul_(1.5)
        return layer

    monkeypatch.setattr(LoraLinear, "unloaded", broken)
    with pytest.raises(ValueError, match="nothing written"):
        merge_checked(str(base_dir), str(adapter), str(tmp_path / "bad"), max_diff=1e-3, force=False)
    assert not (tmp_path / "bad").exists()


def test_train_command(base_dir, data_file, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(base_dir), "train_file": str(data_file), "epochs": 1,
                               "batch_size": 8, "max_length": 64, "output_dir": str(tmp_path / "out")}))
    done = subprocess.run([sys.executable, "-m", "minipeft", "train", "--config", str(job)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trainable params:" in done.stdout and "eval_loss" in done.stdout
    assert isinstance(PeftModel.from_pretrained(load_pretrained(base_dir), tmp_path / "out" / "adapter"), PeftModel)
    job.write_text(json.dumps({"model": str(base_dir), "train_file": str(data_file), "lerning_rate": 1}))
    bad = subprocess.run([sys.executable, "-m", "minipeft", "train", "--config", str(job)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown key 'lerning_rate'" in bad.stderr and "Traceback" not in bad.stderr


def test_resuming_a_finished_job_reports_it(base_dir, data_file, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(base_dir), "train_file": str(data_file), "epochs": 1, "batch_size": 8,
                               "max_length": 64, "output_dir": str(tmp_path / "out"), "logging_steps": 1}))
    first = subprocess.run([sys.executable, "-m", "minipeft", "train", "--config", str(job)], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "minipeft", "train", "--config", str(job), "--resume"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "the run is already complete (7 of 7 steps" in again.stdout
    result = [line for line in first.stdout.splitlines() if line.startswith("steps ")]
    assert "nan" not in again.stdout and result[0].split(" | ")[:-1] in [
        line.split(" | ")[:-1] for line in again.stdout.splitlines()]  # the same result, but for tok/s


def test_resume_with_a_changed_config_keeps_the_job(base_dir, data_file, tmp_path):
    cfg = job_config(base_dir, data_file, tmp_path / "job")
    run_job(cfg)
    saved = (tmp_path / "job" / "job_config.json").read_text()
    with pytest.raises(ValueError, match=r"cannot resume with a different config.*batch_size 8 -> 4"):
        run_job(job_config(base_dir, data_file, tmp_path / "job", batch_size=4), resume=True)
    assert (tmp_path / "job" / "job_config.json").read_text() == saved


def test_a_packed_job(base_dir, data_file, tmp_path):
    """packing: the 54 training examples (55-59 tokens rendered with the tiny tokenizer) share rows
    of max_length 128 tokens, two a row, so an epoch at batch 8 takes ceil(27 / 8) = 4 steps instead
    of 7; the adapter is saved as usual."""
    job = run_job(job_config(base_dir, data_file, tmp_path / "job", packing=True, max_length=128))
    assert job.result.steps == 4 and (job.output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((job.output_dir / "job_config.json").read_text())["packing"] is True


def test_only_rank_0_writes(base_dir, data_file, tmp_path, monkeypatch):
    """In a process that is not rank 0 the job trains and evaluates (here rank 1 of 2 with no
    process group: its own slices and eval batches, the collectives no-ops) but writes nothing:
    no job_config.json, adapter, metrics, plot or checkpoint."""
    from minipeft import distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    job = run_job(job_config(base_dir, data_file, tmp_path / "job", eval_batch_size=2))  # 6 held out: 3 batches
    assert not (tmp_path / "job").exists()
    assert job.result.steps == 4 and job.result.eval["eval_loss"] > 0  # ceil(54 / 16) global batches


def test_a_job_under_torchrun(base_dir, data_file, tmp_path):
    """2 processes: 54 examples in global batches of 16, so rank 1's slice of the last is empty;
    rank 0 alone writes the job directory, and the result is printed once."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(base_dir), "train_file": str(data_file), "epochs": 1, "batch_size": 8,
                               "max_length": 64, "output_dir": str(tmp_path / "out"), "disable_tqdm": True}))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000 + 1), "-m", "minipeft", "train", "--config", str(job)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("job directory:") == 1 and "steps 4 |" in done.stdout
    for name in ("job_config.json", "metrics.jsonl", "loss_curve.png", "adapter/adapter_model.safetensors",
                 "checkpoint-4/trainer_state.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_a_job_that_cannot_run_is_refused_before_the_model_loads(base_dir, data_file, tmp_path, monkeypatch):
    """Each of these used to surface only after the weights had loaded (minutes on a real model):
    as a traceback (FileExistsError, NotADirectoryError, PermissionError), as ": cannot read: Is a
    directory" for the default train_file "", or not at all (max_length past the model's context
    trained silently). Each names its key, and nothing is created."""
    from minipeft import job
    from minipeft.checkpoint import read_config

    monkeypatch.setattr(job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    context = read_config(base_dir).max_position_embeddings
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        ({"max_length": context + 1}, f"max_length={context + 1} exceeds the model's context: "
                                      f"{base_dir / 'config.json'} has max_position_embeddings={context}"),
        ({"train_file": ""}, "train_file is required"),
        ({"template": "chatlm"}, "unknown chat template 'chatlm'; known templates: ['chatml', 'llama2', 'plain']; "
                                 "did you mean 'chatml'?"),
        ({"output_dir": str(afile)}, f"output_dir {afile}: exists and is not a directory"),
        ({"output_dir": str(afile / "sub")}, f"output_dir {afile / 'sub'}: cannot be created: {afile} exists and "
                                             "is not a directory"),
    ]
    if os.path.isdir("/sys/kernel"):  # Linux's sysfs refuses mkdir to everyone, root included
        cases.append(({"output_dir": "/sys/minipeft/out"}, "output_dir /sys/minipeft/out: cannot be created in /sys ("))
    for settings, message in cases:
        with pytest.raises(ValueError) as e:
            run_job(job_config(base_dir, data_file, tmp_path / "job", **settings))
        assert message in str(e.value), settings
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    job.check_context(context, base_dir)  # the whole context is allowed


def test_check_output_dir_names_the_setting_and_creates_nothing(tmp_path):
    """The check that run_job, merge --output and eval --output share: `name` is what the user wrote."""
    assert check_output_dir(tmp_path / "new" / "dir", "--output") == tmp_path / "new" / "dir"
    assert check_output_dir(tmp_path, "--output") == tmp_path
    assert list(tmp_path.iterdir()) == []  # the write check's probe directory is gone
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"--output {tmp_path / 'taken'}: exists and is not a directory")):
        check_output_dir(tmp_path / "taken", "--output")


def test_use_rslora_scales_by_the_root_of_the_rank(base_dir):
    """TrainConfig.use_rslora reaches LoraConfig: s = lora_alpha / sqrt(r) (16 / 2), not / r (16 / 4)."""
    from minipeft.job import attach_method

    for rslora, scaling in ((False, 4.0), (True, 8.0)):
        model = attach_method(load_pretrained(base_dir), TrainConfig(lora_rank=4, lora_alpha=16, use_rslora=rslora))
        assert model.peft_config["default"].use_rslora is rslora
        assert {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLinear)} == {scaling}

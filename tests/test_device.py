"""Where a job computes: the `device` setting, one GPU per torchrun process, the process group's backend.

The choices are checked against a stand-in for torch.cuda (a machine with two GPUs), so they are
proven on every machine; on a machine with a GPU, a real job also trains there and is compared
with the same job on the CPU.
"""
import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as tdist
from safetensors.torch import load_file

from minipeft import distributed, load_pretrained
from minipeft import job
from minipeft import pretrain as pretrain_module
from minipeft.job import DEFAULT_MODEL, run_job
from minipeft.platform.inference import Loaded, Sampling, stream_tokens
from minipeft.pretrain import PretrainConfig, pretrain
from minipeft.templates import get_template
from minipeft.tokenizer import load_tokenizer
from minipeft.train_config import TrainConfig
from minipeft.train_state import check_resumable
from minipeft.trainer import Trainer
from test_job import base_dir, data_file, job_config  # noqa: F401 (fixtures)


def test_auto_and_cpu(no_gpu):
    assert distributed.use_device("auto") == torch.device("cpu")
    assert distributed.use_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "mps", ""])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(ValueError, match=r"expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        distributed.use_device(name)
    with pytest.raises(ValueError, match=rf"device={name!r} \(expected 'auto', 'cpu', 'cuda' or 'cuda:N'\)"):
        TrainConfig(device=name)


def test_cuda_without_a_gpu_names_the_setting(no_gpu):
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"device='{name}': torch sees no GPU .*use device='cpu' or 'auto'"):
            distributed.use_device(name)


def test_alone_cuda_is_the_first_gpu_or_the_one_named(two_gpus):
    assert distributed.use_device("auto") == torch.device("cuda", 0)
    assert distributed.use_device("cuda") == torch.device("cuda", 0)
    assert distributed.use_device("cuda:1") == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 0)] * 2 + [torch.device("cuda", 1)]  # each made current


def test_under_torchrun_each_process_takes_its_local_rank(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.use_device("cuda") == distributed.use_device("auto") == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 1)] * 2
    with pytest.raises(ValueError, match=r"device='cuda:0' puts every one of the 2 processes on one GPU; use "
                                         r"device='cuda' \(or 'auto'\): each process takes cuda:LOCAL_RANK"):
        distributed.use_device("cuda:0")
    assert distributed.use_device("cpu") == torch.device("cpu")  # CPU processes under torchrun: gloo


def test_a_gpu_the_machine_lacks(two_gpus, monkeypatch):
    with pytest.raises(ValueError, match=r"device='cuda:2': cuda:2 does not exist; this machine has 2 GPU"):
        distributed.use_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun --nproc_per_node 3 on two GPUs
    with pytest.raises(ValueError, match=r"device='cuda': cuda:2 does not exist.*--nproc_per_node at most"):
        distributed.use_device("cuda")
    assert two_gpus == []  # nothing made current


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda:0", "nccl")])
def test_the_backend_follows_the_device(device, backend, monkeypatch):
    joined = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", joined.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init(torch.device(device))
    assert joined == []  # alone: no group
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: a group of one
    distributed.init(torch.device(device))
    assert joined == [backend]


def test_a_job_asking_for_a_missing_gpu_stops_before_writing(no_gpu, base_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "job"
    with pytest.raises(ValueError, match=r"device='cuda': torch sees no GPU"):
        run_job(job_config(base_dir, data_file, out, device="cuda"))
    assert not out.exists()


def test_the_job_loads_and_trains_where_device_says(two_gpus, base_dir, data_file, tmp_path, monkeypatch):  # noqa: F811
    """run_job resolves `device` (cuda:1 here, made current) and loads the base there; the stand-in
    has no real GPU, so the load that was asked for cuda:1 is done on the CPU, where the steps run."""
    asked, load, seen, step = [], job.load_pretrained, [], Trainer.train_step

    def load_spy(path, **kw):
        asked.append(kw["device"])
        return load(path, **{**kw, "device": "cpu"})

    def step_spy(self, batch):
        seen.append((self.device, {p.device for p in self.model.parameters()}))
        return step(self, batch)

    monkeypatch.setattr(job, "load_pretrained", load_spy)
    monkeypatch.setattr(Trainer, "train_step", step_spy)
    run_job(job_config(base_dir, data_file, tmp_path / "job", device="cuda:1", max_steps=1, save_strategy="no"))
    assert asked == [torch.device("cuda", 1)] and two_gpus[-1] == torch.device("cuda", 1)
    assert seen == [(torch.device("cpu"), {torch.device("cpu")})]  # the trainer follows the model
    assert json.loads((tmp_path / "job" / "job_config.json").read_text())["device"] == "cuda:1"


def test_a_run_may_resume_on_another_device(tmp_path):
    saved = TrainConfig(device="cpu").to_dict()
    check_resumable(saved, TrainConfig(device="cuda").to_dict(), tmp_path)  # no error
    with pytest.raises(ValueError, match="seed 42 -> 7"):
        check_resumable(saved, TrainConfig(device="cuda", seed=7).to_dict(), tmp_path)



# Pretraining: eight repetitive pages, a tiny model, two steps (test_pretrain covers what it learns).
PAGES = [" ".join(f"Section {i}.{k}: the function returns a dict such as {{'key': {k}}}." for k in range(12))
         for i in range(8)]
TINY_PRETRAIN = PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, context_length=32, batch_size=4, eval_fraction=0.25,
                               eval_windows=8, evaluations=1, learning_rate=0.01, steps=2)


def test_pretraining_runs_where_device_says(two_gpus, tok_dir, tmp_path, monkeypatch):
    """A model pretrained from scratch is initialized on the CPU and moved to cuda:1 (made current);
    one continued (--init) is loaded there; the results name the device and the GPU. The stand-in
    has no real GPU: the moves are recorded and the steps run on the CPU."""
    asked, seen, step, load = [], [], Trainer.train_step, pretrain_module.load_pretrained

    class Placed(pretrain_module.Transformer):
        def to(self, *args, **kwargs):
            asked.append(("init", args[0]))
            return self

    def load_spy(path, **kw):
        asked.append(("load", kw["device"]))
        return load(path, **{**kw, "device": "cpu"})

    def step_spy(self, batch):
        seen.append({p.device for p in self.model.parameters()})
        return step(self, batch)

    monkeypatch.setattr(pretrain_module, "Transformer", Placed)
    monkeypatch.setattr(pretrain_module, "load_pretrained", load_spy)
    monkeypatch.setattr(Trainer, "train_step", step_spy)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"stand-in GPU {device.index}")
    cfg = replace(TINY_PRETRAIN, device="cuda:1")
    first = pretrain(PAGES, tmp_path / "first", cfg, tokenizer_dir=tok_dir, log=lambda line: None)
    then = pretrain(PAGES, tmp_path / "then", cfg, init=tmp_path / "first", log=lambda line: None)
    assert asked == [("init", torch.device("cuda", 1)), ("load", torch.device("cuda", 1))]
    assert two_gpus[-1] == torch.device("cuda", 1) and seen == [{torch.device("cpu")}] * 4
    for results in (first, then):
        assert results["machine"]["device"] == "cuda:1" and results["machine"]["gpu"] == "stand-in GPU 1"
        assert results["config"]["device"] == "cuda:1"


def test_pretraining_asking_for_a_missing_gpu_stops_before_the_corpus(no_gpu, tmp_path, capsys):
    """The corpus named does not exist: the device is checked first, so the error is the device's."""
    from minipeft.cli import main

    out = tmp_path / "model"
    assert main(["pretrain", "--corpus", str(tmp_path / "none.txt"), "--output", str(out), "--device", "cuda"]) == 2
    assert "error: device='cuda': torch sees no GPU" in capsys.readouterr().err
    assert not out.exists()



def test_the_platform_serves_and_trains_where_its_flags_say(two_gpus, tmp_path, monkeypatch):
    """--device: the model pool loads there (recorded, then done on the CPU); --train-device: the
    device a created job's config carries (its worker process trains there)."""
    from minipeft.platform import inference, jobs
    from minipeft.platform.state import Platform, Settings
    from minipeft.platform.store import Store

    asked, load = [], inference.load_pretrained
    monkeypatch.setattr(inference, "load_pretrained",
                        lambda path, **kw: asked.append(kw["device"]) or load(path, **{**kw, "device": "cpu"}))
    platform = Platform(Settings(tmp_path / "state", {"base": DEFAULT_MODEL}, device="cuda:1"))
    loaded, _, _ = platform.pool.get(inference.Target("base", DEFAULT_MODEL))
    platform.close()
    assert asked == [torch.device("cuda", 1)] and two_gpus[-1] == torch.device("cuda", 1)
    assert list(stream_tokens(loaded, None, [1, 2], Sampling(max_tokens=2), stop_ids=[]))

    store = Store(tmp_path / "platform.db")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-1.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    store.insert("files", {"id": "file-1", "filename": "a.jsonl", "purpose": "fine-tune", "bytes": 44, "lines": 1,
                           "format": "instruction", "created_at": 0})
    request = jobs.FineTuneRequest(model="base", training_file_ids=["file-1"])
    job = jobs.create_job(store, {"base": DEFAULT_MODEL}, tmp_path, request, device="cuda:0")
    assert job["config"]["device"] == "cuda:0" and TrainConfig(**job["config"]).device == "cuda:0"
    store.close()


@pytest.mark.parametrize("flag", ["--device", "--train-device"])
def test_the_platform_refuses_a_missing_gpu_before_it_starts(flag, no_gpu, tmp_path, capsys):
    from minipeft.cli import main

    assert main(["platform", "--data-dir", str(tmp_path / "data"), flag, "cuda"]) == 2
    assert f"error: {flag}: device='cuda': torch sees no GPU" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


if torch.cuda.is_available():  # defined on a machine with a GPU only: elsewhere there is nothing to compare
    @pytest.mark.parametrize("method", ["lora", "qlora"])
    def test_a_gpu_job_matches_the_cpu_job(method, base_dir, data_file, tmp_path):  # noqa: F811
        """The same job on the GPU and the CPU: equal losses and adapters up to float rounding (TF32
        is off by default in torch; QLoRA runs the Triton NF4 kernels there, the PyTorch twins here)."""
        runs = {where: run_job(job_config(base_dir, data_file, tmp_path / where, device=where, method=method,
                                          lora_dropout=0.0)) for where in ("cpu", "cuda")}
        cpu, gpu = (load_file(runs[w].output_dir / "adapter" / "adapter_model.safetensors") for w in ("cpu", "cuda"))
        for name in cpu:
            # 7 AdamW steps at lr 5e-3 from the same start; the devices round differently (~1e-7 relative
            # a sum), which DDP's reordered sums show stay within 1e-5 after 11 steps (test_trainer).
            torch.testing.assert_close(gpu[name], cpu[name], atol=1e-3, rtol=1e-2)
        assert runs["cuda"].result.train_loss == pytest.approx(runs["cpu"].result.train_loss, rel=1e-3)


    def test_pretraining_on_the_gpu_matches_the_cpu(tok_dir, tmp_path):
        """The same seeded start (initialized on the CPU, then moved) and the same windows: two steps
        on each device end at the same held-out loss up to float rounding."""
        runs = {device: pretrain(PAGES, tmp_path / device, replace(TINY_PRETRAIN, device=device),
                                 tokenizer_dir=tok_dir, log=lambda line: None) for device in ("cpu", "cuda")}
        assert runs["cuda"]["machine"]["device"] == "cuda:0" and runs["cuda"]["machine"]["gpu"]
        assert runs["cuda"]["eval_loss"] == pytest.approx(runs["cpu"]["eval_loss"], rel=1e-3)  # as the jobs above


    def test_generation_on_the_gpu_matches_the_cpu(capsys):
        """The shipped model's greedy continuation (its logits are peaked: no near-ties for rounding
        to flip), by `minipeft generate` and by the platform's token loop, on each device; a seeded
        sampled reply on the GPU draws from a GPU generator and repeats itself."""
        from minipeft.cli import main

        outs = []
        for device in ("cpu", "cuda"):
            assert main(["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "16", "--device", device]) == 0
            outs.append(capsys.readouterr().out)
        assert outs[0] == outs[1] and outs[0].strip()
        replies = {}
        for device in ("cpu", "cuda"):
            loaded = Loaded(load_pretrained(DEFAULT_MODEL, device=device).eval(), load_tokenizer(DEFAULT_MODEL),
                            {None: get_template("plain")})
            assert loaded.device.type == device
            prompt = loaded.tokenizer.encode("The quick brown fox", bos=True)
            replies[device] = list(stream_tokens(loaded, None, prompt, Sampling(max_tokens=16), stop_ids=[]))
        assert replies["cpu"] == replies["cuda"]
        sampled = [list(stream_tokens(loaded, None, prompt, Sampling(max_tokens=8, temperature=1.0, seed=3), []))
                   for _ in range(2)]
        assert sampled[0] == sampled[1] and len(sampled[0]) > 0


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_commands_take_a_device_and_refuse_a_missing_gpu(command, no_gpu, capsys, tmp_path):
    """generate and eval run where --device says (default auto); a GPU that is not there is one line."""
    from minipeft.cli import main

    data = tmp_path / "test.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    args = {"generate": ["--ids", "1,2"], "eval": ["--data", str(data), "--output", str(tmp_path / "out")]}[command]
    assert main([command, *args, "--device", "cuda"]) == 2
    assert "error: device='cuda': torch sees no GPU" in capsys.readouterr().err

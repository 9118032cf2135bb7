"""The trainer: token-normalized accumulation, exact resume after SIGKILL, DDP, diagnostics."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minipeft import distributed
from minipeft.lora import LoraConfig
from minipeft.diagnostics import overfitting, unstable_loss
from minipeft.peft_model import full_finetune, get_peft_model
from minipeft.train_config import TrainConfig
from minipeft.trainer import Trainer, TrainingDiverged, param_groups
from minipeft.train_state import list_checkpoints
from conftest import tiny_model

HERE = Path(__file__).parent


def ragged_data(n=40, seed=0, vocab=131):
    """Examples of different lengths and prompt/reply splits: what makes accumulation bugs show."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        length = rng.randint(3, 14)
        ids = [rng.randrange(vocab) for _ in range(length)]
        cut = rng.randint(1, length - 1)
        data.append((ids, [-100] * cut + ids[cut:]))
    return data


def lora_trainer(tmp_path, data=None, device="cpu", family="llama-gqa", **overrides):
    cfg = TrainConfig(**{"output_dir": str(tmp_path), "batch_size": 4, "n_epochs": 2, "logging_steps": 1,
                         "learning_rate": 1e-2, "lora_dropout": 0.1, **overrides})
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_dropout=cfg.lora_dropout)).to(device)
    return Trainer(cfg, model, data or ragged_data(), ragged_data(8, seed=1))


def grads_after_one_step(tmp_path, batch_size, accum):
    t = lora_trainer(tmp_path, batch_size=batch_size, gradient_accumulation_steps=accum, lora_dropout=0.0,
                     max_grad_norm=0.0)
    captured = {}
    t.optimizer.step = lambda: captured.update({id(p): p.grad.clone() for p in t.params})
    loss, _, tokens = t.train_step(list(range(8)))
    return loss, tokens, [captured[id(p)] for p in t.params]


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    """g * min(1, c / ||g||) over all trainable gradients together (the global L2 norm), as HF's Trainer
    clips; the step reports ||g|| before clipping."""
    def step(max_grad_norm):
        t = lora_trainer(tmp_path / str(max_grad_norm), lora_dropout=0.0, max_grad_norm=max_grad_norm)
        captured = {}
        t.optimizer.step = lambda: captured.update({id(p): p.grad.clone() for p in t.params})
        _, grad_norm, _ = t.train_step(list(range(8)))
        return grad_norm, [captured[id(p)].double() for p in t.params]
    _, raw = step(0.0)  # 0: no clipping
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in raw])).item()
    for c in (norm / 3, 10 * norm):
        reported, clipped = step(c)
        assert reported == pytest.approx(norm, rel=1e-6)
        for got, g in zip(clipped, raw):
            torch.testing.assert_close(got, g * min(1.0, c / norm), rtol=1e-5, atol=1e-9)


def test_accumulation_is_normalized_by_supervised_tokens(tmp_path):
    """bs=2 x accum=4 gives the loss and gradients of bs=8 on variable-length data."""
    loss8, tok8, g8 = grads_after_one_step(tmp_path / "a", 8, 1)
    loss2, tok2, g2 = grads_after_one_step(tmp_path / "b", 2, 4)
    assert tok8 == tok2
    assert loss8 == pytest.approx(loss2, rel=1e-6)
    for a, b in zip(g8, g2):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)  # float32 sums in another order


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_a_packed_step_equals_the_padded_step(tmp_path, family):
    """The same 12 ragged examples as one padded micro-batch and as packed rows, each example
    seeing only itself at its own positions: the same loss and gradients (LoRA B perturbed, so A
    gets gradients too), with no compute spent on padding."""
    data = ragged_data(12)
    grads, losses = {}, {}
    for packing in (False, True):
        t = lora_trainer(tmp_path / str(packing), data, family=family, batch_size=12, lora_dropout=0.0,
                         max_grad_norm=0.0, packing=packing, max_length=32)
        with torch.no_grad():
            for name, p in t.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        captured = {}
        t.optimizer.step = lambda: captured.update({id(p): p.grad.clone() for p in t.params})
        losses[packing], _, _ = t.train_step(list(range(len(t.train_data))))
        grads[packing] = [captured[id(p)] for p in t.params]
        if packing:
            rows = t.train_data
            assert len(rows) < len(data) and all(len(r.input_ids) <= 32 for r in rows)
            assert sorted(n for r in rows for n in r.lengths) == sorted(len(ids) for ids, _ in data)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)  # float32 sums in another order


def test_weight_decay_only_on_matrices():
    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=2, bias="all"))
    decayed, plain = param_groups(model, 0.01)
    assert all(p.dim() == 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.01
    assert plain["params"] and all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0


def test_checkpoints_rotate_and_hold_everything(tmp_path):
    t = lora_trainer(tmp_path, save_strategy="steps", save_steps=3, save_total_limit=2)
    result = t.train()
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["checkpoint-18", "checkpoint-20"]  # 20: the last step, saved too
    assert {p.name for p in kept[-1].iterdir()} == {"adapter", "optimizer.safetensors", "optimizer.json",
                                                    "rng.safetensors", "trainer_state.json", "trainable.safetensors"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert sum("eval_loss" in r for r in rows) == 2  # one evaluation per epoch
    assert result.steps == 20 and result.eval["eval_loss"] > 0


def test_logged_loss_is_the_mean_since_the_previous_log(tmp_path):
    """logging_steps=3 logs the mean of each 3 steps' losses (and of the 2 left at the end), as
    Hugging Face's Trainer does: single noisy steps would trip the oscillation diagnostic."""
    logged = {}
    for every in (1, 3):
        lora_trainer(tmp_path / str(every), n_epochs=1, logging_steps=every, lora_dropout=0.0).train()
        rows = (tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()
        logged[every] = {r["step"]: r["loss"] for r in map(json.loads, rows) if "loss" in r}
    assert list(logged[3]) == [3, 6, 9, 10]
    for step, start in ((3, 1), (6, 4), (9, 7), (10, 10)):
        window = [logged[1][s] for s in range(start, step + 1)]
        assert logged[3][step] == pytest.approx(sum(window) / len(window), rel=1e-6)


SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_trainer import lora_trainer
import minipeft.trainer as tr
slow = float(sys.argv[2])
step = tr.Trainer.train_step
def slow_step(self, batch):
    time.sleep(slow)
    return step(self, batch)
tr.Trainer.train_step = slow_step
t = lora_trainer(sys.argv[1], save_strategy="steps", save_steps=1, save_total_limit=2, logging_steps=3)
t.train(resume=len(sys.argv) > 3)
t.model.save_pretrained(sys.argv[1] + "/final")
"""


def run_script(tmp_path, out, slow, resume=False, wait=True):
    script = tmp_path / "train_job.py"
    script.write_text(SCRIPT.format(tests=str(HERE)))
    cmd = [sys.executable, str(script), str(out), str(slow)] + (["resume"] if resume else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    return proc


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    run_script(tmp_path, tmp_path / "clean", 0.0)
    kill_after = random.Random(os.getpid()).randint(3, 15)  # a random step, recorded on failure
    proc = run_script(tmp_path, tmp_path / "killed", 0.15, wait=False)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / f"checkpoint-{kill_after}").exists():
        assert time.time() < deadline and proc.poll() is None, "training ended before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_script(tmp_path, tmp_path / "killed", 0.0, resume=True)
    clean = load_file(tmp_path / "clean" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert clean.keys() == resumed.keys()
    for k in clean:
        assert torch.equal(clean[k], resumed[k]), (k, kill_after)
    # the logs too, but for the throughput: a 3-step loss mean across the kill averages all 3 steps
    assert without_rates(logged(tmp_path / "killed")) == without_rates(logged(tmp_path / "clean")), kill_after


def without_rates(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_non_finite_gradient_stops_before_the_step(tmp_path):
    """A finite loss with an infinite gradient: the step is not applied and nothing poisoned is
    saved; the error names the last good checkpoint, as for a non-finite loss."""
    t = lora_trainer(tmp_path, save_strategy="steps", save_steps=2)
    lora_b = next(p for n, p in t.model.named_parameters() if "lora_B" in n)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 6 else grad

    lora_b.register_hook(poison)
    before = {}
    step = t.train_step
    t.train_step = lambda batch: before.update({id(p): p.detach().clone() for p in t.params}) or step(batch)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became inf at step 6.*checkpoint-4"):
        t.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    for p in t.params:  # the weights of step 5, unchanged
        assert torch.equal(p.detach(), before[id(p)])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    t = lora_trainer(tmp_path, save_strategy="steps", save_steps=2)
    real = t._nll
    calls = {"n": 0}

    def poisoned(examples):
        calls["n"] += 1
        nll = real(examples)
        return nll * float("nan") if calls["n"] > 5 else nll

    t._nll = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*checkpoint-4"):
        t.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]



def test_a_diverged_run_closes_its_progress_bar_and_tensorboard_writer(tmp_path, monkeypatch):
    """TrainingDiverged left the tqdm bar open (its line never ended) and TensorBoard's writer and
    its event thread running."""
    from tqdm import tqdm

    from minipeft.trainer import MetricsLog
    closed = []
    close = MetricsLog.close
    monkeypatch.setattr(MetricsLog, "close", lambda self: closed.append(self.writer) or close(self))
    t = lora_trainer(tmp_path, disable_tqdm=False, report_to="tensorboard")
    real = t._nll
    t._nll = lambda examples: real(examples) * float("nan")
    bars = set(tqdm._instances)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1"):
        t.train()
    assert set(tqdm._instances) == bars
    assert len(closed) == 1 and closed[0] is not None

def test_too_large_learning_rate_warns(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=2, n_epochs=1, logging_steps=1, learning_rate=0.3,
                      warmup_ratio=0.0, max_grad_norm=0.0)
    torch.manual_seed(0)
    t = Trainer(cfg, full_finetune(tiny_model()), ragged_data())
    with pytest.warns(UserWarning, match="learning rate may be too large"):
        t.train()
    sound = lora_trainer(tmp_path / "sound", n_epochs=1)
    assert not sound.train().warnings


def test_diagnostics_read_the_curves():
    assert unstable_loss([4.0, 4.1, 3.9, 3.8, 3.7, 3.5, 3.4, 3.3]) is None
    assert "rising" in unstable_loss([4.0, 4.1, 3.9, 5.0, 6.0, 7.0, 6.5, 7.5])
    swings = [4.0, 4.0, 4.0] + [2.0, 4.0] * 5
    assert "oscillates" in unstable_loss(swings)
    # the demo's first logged losses (5-step means, batch 4): a zigzag, but falling; not a warning
    falling = [3.775, 3.826, 3.724, 0.469, 0.413, 0.348, 0.392, 0.383, 0.385, 0.349, 0.255, 0.295, 0.312, 0.24]
    assert unstable_loss(falling) is None and "oscillates" in unstable_loss(falling[:3] + falling[:-11:-1])
    assert overfitting([(2.0, 2.1), (1.5, 2.0), (1.0, 2.2)]) is None  # eval fell, then rose once
    assert "over-fitting" in overfitting([(2.0, 2.0), (1.5, 2.1), (1.0, 2.3)])
    assert overfitting([(2.0, 2.0), (2.1, 2.1), (2.2, 2.3)]) is None  # both rise: not over-fitting


def test_the_final_evaluation_enters_the_over_fitting_check(tmp_path, monkeypatch):
    """10 steps at eval_steps=4: evaluations at 4, 8 and the final one at 10. The final one was
    logged but left out of the check, though its eval loss is the one most likely to have risen."""
    import minipeft.trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module, "overfitting", lambda evals: seen.append(list(evals)) or None)
    lora_trainer(tmp_path, n_epochs=1, eval_steps=4).train()
    assert [len(evals) for evals in seen] == [1, 2, 3]
    assert seen[-1][-1][1] == [r for r in logged(tmp_path) if "eval_loss" in r][-1]["eval_loss"]


def test_adam_betas_reach_the_optimizer(tmp_path):
    assert lora_trainer(tmp_path / "a").optimizer.defaults["betas"] == (0.9, 0.999)  # Hugging Face's defaults
    t = lora_trainer(tmp_path / "b", adam_beta1=0.8, adam_beta2=0.95)
    assert all(g["betas"] == (0.8, 0.95) for g in t.optimizer.param_groups)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'learning_rat'"):
        TrainConfig.from_dict({"learning_rat": 1e-4})
    with pytest.raises(ValueError, match=r"warmup_ratio=1.5 \(expected in \[0, 1\)\)"):
        TrainConfig.from_dict({"warmup_ratio": 1.5})
    with pytest.raises(ValueError, match=r"adam_beta2=1.0 \(expected in \[0, 1\)\)"):
        TrainConfig.from_dict({"adam_beta2": 1.0})
    cfg = TrainConfig.from_dict({"epochs": 5, "r": 16})
    assert (cfg.n_epochs, cfg.lora_rank) == (5, 16)
    (tmp_path / "job.json").write_text('{"batch_size": 4,}')
    with pytest.raises(ValueError, match="job.json: invalid JSON at line 1"):
        TrainConfig.load(tmp_path / "job.json")


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import minipeft.trainer as tr
import test_trainer
from minipeft import distributed
from test_trainer import lora_trainer, ragged_data
out, batch_size, examples, device, options = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
options = json.loads(options)
crash_at, resume, python = options.pop("crash_at", 0), options.pop("resume", False), options.pop("python", False)
device = distributed.use_device(device)
if python:  # a Trainer built from Python alone, with each rank's adapter drawn from a seed of its own
    get_peft_model = test_trainer.get_peft_model
    def seeded_by_rank(model, config):
        torch.manual_seed(int(os.environ.get("RANK", 0)))
        return get_peft_model(model, config)
    test_trainer.get_peft_model = seeded_by_rank
else:  # as run_job does
    distributed.init(device)
save = tr.Trainer._save
def save_then_crash(self):  # every rank dies just after the checkpoint, as if killed: no clean-up
    save(self)
    if self.step == crash_at:
        os._exit(3)
tr.Trainer._save = save_then_crash
t = lora_trainer(out, ragged_data(examples), batch_size=batch_size, device=device,
                 **{{"lora_dropout": 0.0, "n_epochs": 1, **options}})
def probe(model):  # a compute_metrics hook that leaves a trace of the rank that ran it
    with open(f"{{out}}/probe_ran_on_rank{{distributed.rank()}}", "a") as f:
        f.write("x")
    return {{"probe": 1.0}}
t.compute_metrics = probe
t.train(resume=resume)
if distributed.rank() == 0:
    t.model.save_pretrained(out + "/final")
"""


def ddp_job(tmp_path, out, ranks, device, check=True, **options):
    """The job above on `ranks` processes under torchrun (0: one plain process), 41 examples in
    global batches of 4; the finished adapter lands in out/final."""
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_SCRIPT.format(tests=str(HERE)))
    args = [str(script), str(out), str(4 // max(ranks, 1)), "41", device, json.dumps(options)]
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
              "--master_port", str(29500 + os.getpid() % 1000)] if ranks else []
    run = subprocess.run([sys.executable, *launch, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 or not check, run.stderr[-3000:]
    return run


# gloo between 2 CPU processes; with GPUs, NCCL between one process per GPU (at most 2): on a
# one-GPU machine a group of one, which still runs NCCL's all-reduce and barrier.
DDP_RANKS = {"cpu": 2, **({"cuda": min(2, torch.cuda.device_count())} if torch.cuda.is_available() else {})}


@pytest.mark.parametrize("python", [False, True], ids=["run_job", "python"])
@pytest.mark.parametrize("device", sorted(DDP_RANKS))
def test_ddp_equals_one_process(tmp_path, device, python):
    """41 examples in global batches of 4: with 2 ranks the 11th holds one example, so rank 1's
    slice is empty; it contributes zero gradients through the same collectives as rank 0.

    python: the script joins no process group and each rank draws another adapter initialization.
    Only run_job joined torchrun's group: a Trainer built from Python ran as 2 unrelated
    one-process runs (each all 41 examples in batches of 2), both writing rank 0's files; as torch's
    DistributedDataParallel, the Trainer joins the group and starts every rank from rank 0's weights."""
    ddp_job(tmp_path, tmp_path / "ddp", DDP_RANKS[device], device, python=python)
    ddp_job(tmp_path, tmp_path / "single", 0, device, python=python)
    ddp = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    for k in single:
        # Same global batch (2 ranks x 2 = 4); gradients summed in another order: float32 noise,
        # amplified a little by 11 AdamW steps.
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4)
    ddp_rows, single_rows = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] and ddp_rows[-2]["step"] == 11
    # compute_metrics ran on rank 0 alone, once an evaluation (epoch 1's end, step 11), and was logged
    assert [f.name for f in (tmp_path / "ddp").glob("probe_ran_on_rank*")] == ["probe_ran_on_rank0"]
    assert (tmp_path / "ddp" / "probe_ran_on_rank0").read_text() == "x" and ddp_rows[-1]["probe"] == 1.0
    for a, b in zip(ddp_rows, single_rows):
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(b.get("loss", b.get("eval_loss")), rel=1e-5)


def test_gradients_travel_in_buckets(monkeypatch):
    """One collective per bucket: consecutive tensors of one dtype up to BUCKET_BYTES (64 here),
    a larger one alone. (Summed per tensor, a LoRA model's 72 small gradients took 80 ms a step
    over gloo between 2 CPU processes; in buckets, 2 ms.)"""
    monkeypatch.setattr(distributed, "BUCKET_BYTES", 64)
    ts = [torch.zeros(n, dtype=dtype) for n, dtype in [(4, torch.float32), (4, torch.float32), (4, torch.float32),
                                                        (8, torch.float64), (2, torch.float64), (40, torch.float32),
                                                        (1, torch.float32)]]
    assert [[t.numel() for t in b] for b in distributed.buckets(ts)] == [[4, 4, 4], [8], [2], [40], [1]]


def test_ddp_resume_is_bitwise_equal(tmp_path):
    """Dropout on, and the 2 CPU ranks' slices differ in shape, so their generators drift apart:
    each rank's own states are checkpointed, and a run that died after step 8's checkpoint, resumed,
    ends bitwise equal to a run that did not. (On GPUs, atomic adds in backward kernels make even
    two whole runs differ in their last bits: there the DDP test above compares within tolerance.)"""
    options = dict(lora_dropout=0.1, n_epochs=2, save_strategy="steps", save_steps=4)
    ddp_job(tmp_path, tmp_path / "whole", 2, "cpu", **options)
    died = ddp_job(tmp_path, tmp_path / "resumed", 2, "cpu", check=False, crash_at=8, **options)
    assert died.returncode != 0 and list_checkpoints(tmp_path / "resumed")[-1].name == "checkpoint-8"
    assert "rank1.cpu" in load_file(tmp_path / "resumed" / "checkpoint-8" / "rng.safetensors")
    ddp_job(tmp_path, tmp_path / "resumed", 2, "cpu", resume=True, **options)
    whole = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def logged(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_max_steps_overrides_epochs_and_the_schedule_spans_them(tmp_path):
    """40 examples / batch 4 = 10 steps an epoch: max_steps=25 runs 2.5 epochs, evaluating at each
    epoch's end and at the last step, and the linear schedule reaches 0 at step 25, not 30."""
    t = lora_trainer(tmp_path, max_steps=25, n_epochs=1, warmup_ratio=0.0, save_strategy="no")
    result = t.train()
    rows = logged(tmp_path)
    assert result.steps == 25 and [r["step"] for r in rows if "loss" in r] == list(range(1, 26))
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20, 25]
    assert rows[-2]["lr"] == pytest.approx(1e-2 * (1 - 24 / 25))  # the lr used by step 25 (0-based 24)
    assert not list_checkpoints(tmp_path)  # save_strategy="no"


def test_eval_batch_size_does_not_change_the_metrics(tmp_path):
    """Evaluation is token-weighted over the whole split, so its batch size only changes speed."""
    sizes = []
    results = []
    for size in (1, 3, 8):
        t = lora_trainer(tmp_path / str(size), eval_batch_size=size)
        real = t._forward
        t._forward = lambda ex, return_hidden, real=real: sizes.append(len(ex)) or real(ex, return_hidden)
        results.append(t.evaluate())
    assert sizes == [1] * 8 + [3, 3, 2] + [8]
    for r in results[1:]:
        for k in r:
            assert r[k] == pytest.approx(results[0][k], rel=1e-5)


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    """With tensorboard installed (report_to "auto"), every number of metrics.jsonl is a scalar in
    output_dir/tensorboard, read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lora_trainer(tmp_path, n_epochs=1, disable_tqdm=True).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = logged(tmp_path)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("eval/eval_loss", "eval_loss")):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    none = tmp_path / "none"
    lora_trainer(none, n_epochs=1, report_to="none").train()
    assert not (none / "tensorboard").exists()


def test_report_to_tensorboard_without_the_package_is_an_error(tmp_path, monkeypatch):
    import minipeft.train_log as train_log

    monkeypatch.setattr(train_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        lora_trainer(tmp_path, report_to="tensorboard").train()
    lora_trainer(tmp_path / "auto", n_epochs=1).train()  # "auto" without it: metrics.jsonl only
    assert not (tmp_path / "auto" / "tensorboard").exists()


def test_disable_tqdm_silences_the_bar(tmp_path, capfd):
    lora_trainer(tmp_path, n_epochs=1, disable_tqdm=True).train()
    assert "train" not in capfd.readouterr().err
    lora_trainer(tmp_path / "bar", n_epochs=1).train()
    assert "train: 100%" in capfd.readouterr().err


def test_compute_metrics_joins_every_evaluation(tmp_path):
    t = lora_trainer(tmp_path, n_epochs=2, disable_tqdm=True)
    seen = []
    t.compute_metrics = lambda model: seen.append(model.training) or {"probe": float(len(seen))}
    result = t.train()
    evals = [r for r in logged(tmp_path) if "eval_loss" in r]
    # the final evaluation is the last epoch's, logged and run once
    assert [r["probe"] for r in evals] == [1.0, 2.0] and result.eval["probe"] == 2.0
    assert seen == [False, False] and t.model.training  # run in eval mode, training mode restored


def test_gradient_checkpointing_in_the_config_reaches_the_model(tmp_path, monkeypatch):
    """As Hugging Face's Trainer, gradient_checkpointing=True turns recomputation on in the model it is
    given: only job.load_base set it, so from Python the setting did nothing (and the memory it
    should save was spent). Recomputation gives the very same weights, dropout included."""
    import minipeft.model as model_module

    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    weights = {}
    for on in (False, True):
        t = lora_trainer(tmp_path / str(on), max_steps=3, gradient_checkpointing=on, save_strategy="no",
                         disable_tqdm=True, report_to="none")
        t.train()
        weights[on] = [p.detach().clone() for p in t.params]
        assert bool(calls) == on
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))


def test_each_diagnostic_warns_once(tmp_path):
    """The loss-rising message quotes the latest mean, so deduplicating by text warned again at
    every log of the first epoch (4 times in 20 steps here; hundreds in a long epoch), and the
    report listed each."""
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=2, n_epochs=1, logging_steps=1, learning_rate=0.3,
                      warmup_ratio=0.0, max_grad_norm=0.0, disable_tqdm=True, report_to="none")
    torch.manual_seed(0)
    t = Trainer(cfg, full_finetune(tiny_model()), ragged_data())
    with pytest.warns(UserWarning, match="learning rate may be too large") as caught:
        result = t.train()
    assert len(caught) == 1 and len(result.warnings) == 1 and "rising early" in result.warnings[0]

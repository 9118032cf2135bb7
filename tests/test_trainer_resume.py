"""Resuming a run: the config must be the checkpoint's, metrics.jsonl survives a crash mid-append,
a finished run is not rerun, the logs equal an uninterrupted run's, the last evaluation is logged."""
import json

import pytest
import torch

from minipeft.train_state import list_checkpoints
from minipeft.trainer import read_metrics
from test_trainer import logged, lora_trainer, without_rates


class Stop(Exception):
    pass


def interrupted(out, after, trainer=lora_trainer, **overrides):
    """A run of `trainer(out, ...)` that dies once step `after` is checkpointed (save_steps=1)."""
    t = trainer(out, save_strategy="steps", save_steps=1, **overrides)
    step = t.train_step

    def dying(batch):
        if t.step == after:
            raise Stop
        return step(batch)

    t.train_step = dying
    with pytest.raises(Stop):
        t.train()
    return t


def test_resumed_logs_equal_an_uninterrupted_run(tmp_path):
    """logging_steps=3, resumed from step 4: step 6 logs the mean of steps 4-6, as without the
    interruption; TensorBoard keeps the events of the checkpoint's step (its evaluation)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = dict(n_epochs=1, logging_steps=3, eval_steps=2, save_strategy="steps", save_steps=1)
    clean = lora_trainer(tmp_path / "clean", **options)
    clean_result = clean.train()
    interrupted(tmp_path / "resumed", 4, n_epochs=1, logging_steps=3, eval_steps=2)
    resumed = lora_trainer(tmp_path / "resumed", **options)
    assert resumed.train(resume=True).train_loss == clean_result.train_loss  # the mean over all 10 steps
    assert without_rates(logged(tmp_path / "resumed")) == without_rates(logged(tmp_path / "clean"))
    for a, b in zip(clean.params, resumed.params):
        assert torch.equal(a, b)
    events = EventAccumulator(str(tmp_path / "resumed" / "tensorboard"))
    events.Reload()
    # Sorted: the files are read in name order, and in one process the writers' counter in their
    # names goes 9 -> 10, which sorts first. A step logged twice would still show.
    assert sorted(e.step for e in events.Scalars("train/loss")) == [3, 6, 9, 10]
    assert sorted(e.step for e in events.Scalars("eval/eval_loss")) == [2, 4, 6, 8, 10]


def test_resume_with_a_changed_config_names_each_key(tmp_path):
    lora_trainer(tmp_path, n_epochs=1, batch_size=4).train()  # checkpoint-10 (save_strategy "epoch")
    changed = lora_trainer(tmp_path, n_epochs=2, batch_size=8, seed=1, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"checkpoint-10/trainer_state.json: cannot resume with a different config"
                                         r".*batch_size 4 -> 8; seed 42 -> 1; weight_decay 0.01 -> 0.1; restore"):
        changed.train(resume=True)
    assert changed.step == 0  # nothing restored
    # logging, evaluation and saving cadence do not change the weights: allowed
    cadence = lora_trainer(tmp_path, n_epochs=1, logging_steps=5, eval_steps=3, save_total_limit=1,
                           disable_tqdm=True)
    assert cadence.train(resume=True).steps == 10


def test_a_line_cut_short_is_dropped_and_a_malformed_one_named(tmp_path):
    interrupted(tmp_path, 4)
    metrics = tmp_path / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"step": 5, "lo')  # killed while appending step 5's row
    assert read_metrics(metrics) == [json.loads(line) for line in complete.splitlines()]
    assert len(read_metrics(metrics)) == 4
    assert lora_trainer(tmp_path, save_strategy="steps", save_steps=1).train(resume=True).steps == 20
    assert [r["step"] for r in logged(tmp_path) if "loss" in r] == list(range(1, 21))
    lines = complete.splitlines(keepends=True)
    metrics.write_text(lines[0] + '{"step": 2,\n' + "".join(lines[2:]))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2: invalid JSON"):
        read_metrics(metrics)
    metrics.write_text(lines[0] + '[2]\n')
    with pytest.raises(ValueError, match=r'metrics.jsonl: line 2: expected a JSON object with an integer "step"'):
        read_metrics(metrics)


def test_resuming_a_finished_run_returns_its_result(tmp_path, capsys):
    first = lora_trainer(tmp_path, n_epochs=1, disable_tqdm=True).train()
    rows = logged(tmp_path)
    again = lora_trainer(tmp_path, n_epochs=1, disable_tqdm=True)
    again.evaluate = lambda: pytest.fail("a finished run is evaluated again")
    result = again.train(resume=True)
    assert "the run is already complete (10 of 10 steps" in capsys.readouterr().out
    assert (result.steps, result.train_loss, result.eval) == (10, first.train_loss, first.eval)
    assert result.tokens_per_second == rows[-2]["tokens_per_s"] > 0
    assert logged(tmp_path) == rows  # nothing logged twice


@pytest.mark.parametrize("eval_steps, at", [(100, [10]), (5, [5, 10]), (0, [10])])
def test_the_final_evaluation_is_logged_once(tmp_path, eval_steps, at):
    """eval_steps beyond the run still logs the final evaluation; one that falls on the last step
    (or the end of the epoch) is not run twice."""
    t = lora_trainer(tmp_path, n_epochs=1, eval_steps=eval_steps, disable_tqdm=True)
    calls = []
    real = t.evaluate
    t.evaluate = lambda: calls.append(t.step) or real()
    result = t.train()
    evals = [r for r in logged(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == at == calls
    assert result.eval == {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}


def prefix_trainer(out, **overrides):
    """Prefix tuning through its MLP: the PEFT-format adapter holds the MLP's output, not its parameters."""
    from minipeft.peft_model import get_peft_model
    from minipeft.prompt_learning import PrefixTuningConfig
    from minipeft.train_config import TrainConfig
    from minipeft.trainer import Trainer
    from conftest import tiny_model
    from test_trainer import ragged_data

    cfg = TrainConfig(output_dir=str(out), batch_size=4, max_steps=6, logging_steps=1, learning_rate=1e-2,
                      method="prefix", report_to="none", disable_tqdm=True, **overrides)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    return Trainer(cfg, model, ragged_data(), ragged_data(8, seed=1))


def test_resumed_prefix_projection_run_is_bitwise_equal(tmp_path):
    """Resume restores the very parameters the optimizer holds (the MLP's), in place: loading the folded
    table instead left the optimizer stepping discarded parameters, and training silently stopped."""
    clean = prefix_trainer(tmp_path / "clean")
    clean.train()
    interrupted(tmp_path / "resumed", 2, trainer=prefix_trainer)
    resumed = prefix_trainer(tmp_path / "resumed", save_strategy="steps", save_steps=1)
    held = {id(p) for p in resumed.params}
    resumed.train(resume=True)
    assert {id(p) for p in resumed.model.parameters() if p.requires_grad} == held
    for a, b in zip(clean.params, resumed.params):
        assert torch.equal(a, b)
    assert without_rates(logged(tmp_path / "resumed")) == without_rates(logged(tmp_path / "clean"))


def test_resume_may_switch_gradient_checkpointing_and_respell_paths(tmp_path, monkeypatch):
    """Recomputation gives the same weights (switching it on after an out-of-memory crash is why one
    resumes); a relative and an absolute path name the same file. Another file is still refused."""
    data = tmp_path / "train.jsonl"
    data.write_text("")
    monkeypatch.chdir(tmp_path)
    interrupted(tmp_path / "run", 2, train_file="train.jsonl")
    same = lora_trainer(tmp_path / "run", save_strategy="steps", save_steps=1, train_file=str(data),
                        gradient_checkpointing=True)
    assert same.train(resume=True).steps == 20
    other = lora_trainer(tmp_path / "run", save_strategy="steps", save_steps=1, train_file="other.jsonl")
    with pytest.raises(ValueError, match=r"train_file '.*train.jsonl' -> 'other.jsonl'"):
        other.train(resume=True)


def test_resume_may_reorder_target_modules_but_not_change_them(tmp_path):
    interrupted(tmp_path / "run", 2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"target_modules \['q_proj', 'v_proj'\] -> \['q_proj'\]"):
        lora_trainer(tmp_path / "run", save_strategy="steps", save_steps=1, target_modules=["q_proj"]).resume()
    reordered = lora_trainer(tmp_path / "run", save_strategy="steps", save_steps=1, target_modules=["v_proj", "q_proj"])
    assert reordered.train(resume=True).steps == 20


def test_a_damaged_checkpoint_file_is_named_on_resume(tmp_path):
    """optimizer.safetensors cut short (a full disk mid-copy): resuming names the file, instead of
    safetensors' SafetensorError traceback."""
    import re

    interrupted(tmp_path, 2)
    optimizer = tmp_path / "checkpoint-2" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{optimizer}: not a readable safetensors file (truncated or "
                                                   "corrupt?)")):
        lora_trainer(tmp_path, save_strategy="steps", save_steps=1).train(resume=True)


def test_a_damaged_optimizer_json_is_named_on_resume(tmp_path):
    """It was read with json.loads: "Expecting value: line 1 column 1 (char 0)", naming no file."""
    interrupted(tmp_path, 2)
    groups = tmp_path / "checkpoint-2" / "optimizer.json"
    groups.write_text("")
    with pytest.raises(ValueError, match=f"{groups}: invalid JSON at line 1 column 1"):
        lora_trainer(tmp_path, save_strategy="steps", save_steps=1).train(resume=True)


def test_checkpoint_directories_follow_the_umask(tmp_path, monkeypatch):
    """They were drwx------ (tempfile.mkdtemp's 0700) while every other output follows the umask."""
    from minipeft import files

    monkeypatch.setattr(files, "_UMASK", 0o022)  # read once at import; this umask gives 0755
    interrupted(tmp_path, 2)
    assert [p.stat().st_mode & 0o777 for p in sorted(tmp_path.glob("checkpoint-*"))] == [0o755, 0o755]


def test_steps_checkpoints_include_the_last_step_and_train_loss_is_the_runs_mean(tmp_path, capsys):
    """14 steps (40 examples, batch 3) at save_steps=5: checkpoints 5, 10 and 14, as HF saves the
    last step too; without 14, resuming the finished run retrained steps 11-14. train_loss is the mean of every step's
    loss (HF's training_loss), not the last step's (here a 1-example leftover batch)."""
    t = lora_trainer(tmp_path, n_epochs=1, batch_size=3, logging_steps=1, save_strategy="steps", save_steps=5,
                     save_total_limit=5, disable_tqdm=True)
    result = t.train()
    assert result.steps == 14 and [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-5", "checkpoint-10", "checkpoint-14"]
    losses = [r["loss"] for r in logged(tmp_path) if "loss" in r]
    assert len(losses) == 14 and result.train_loss == pytest.approx(sum(losses) / 14, rel=1e-12)
    again = lora_trainer(tmp_path, n_epochs=1, batch_size=3, logging_steps=1, save_strategy="steps", save_steps=5,
                         save_total_limit=5, disable_tqdm=True)
    again.train_step = lambda batch: pytest.fail("a finished run trains again")
    assert again.train(resume=True).train_loss == result.train_loss
    assert "the run is already complete (14 of 14 steps" in capsys.readouterr().out


def test_a_checkpoint_is_on_disk_before_rotation_deletes_the_one_before(tmp_path, monkeypatch):
    """As write_atomic: every file's data is fsynced before the rename that publishes the checkpoint,
    and the directory after it, before save_total_limit deletes the previous checkpoint. The files
    were left in the page cache: a power loss could persist the rename and the deletion but not the
    data, leaving an unreadable newest checkpoint and no other one."""
    import os

    import minipeft.train_state as train_state

    events = []
    real_fsync, real_rmtree = os.fsync, train_state.shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(train_state.shutil, "rmtree",
                        lambda path, **k: events.append(("rmtree", os.path.basename(path))) or real_rmtree(path, **k))
    interrupted(tmp_path, 3, save_total_limit=1)  # checkpoint-3 rotates checkpoint-2 out
    deleted = events.index(("rmtree", "checkpoint-2"))
    newest = tmp_path / "checkpoint-3"
    synced = {ino for what, ino in events[:deleted] if what == "fsync"}
    assert {p.stat().st_ino for p in newest.rglob("*")} <= synced  # each file and directory
    last_file = max(i for i, (what, ino) in enumerate(events) if what == "fsync" and ino == newest.stat().st_ino)
    assert ("fsync", tmp_path.stat().st_ino) in events[last_file:deleted]  # the rename, then the deletion


def test_a_fresh_run_among_another_runs_checkpoints_is_refused(tmp_path):
    """Trained into a folder holding an earlier run's checkpoints, a fresh run would lose its own:
    rotation goes by step (the earlier run's checkpoint-10 outlives a new checkpoint-2), and a
    later resume would continue the earlier run."""
    lora_trainer(tmp_path, n_epochs=1, save_strategy="steps", save_steps=5).train()  # checkpoint-5, -10
    before = sorted(p.name for p in tmp_path.iterdir())
    fresh = lora_trainer(tmp_path, n_epochs=1, save_strategy="steps", save_steps=2, save_total_limit=1)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-10\): "
                                         r"train\(resume=True\) continues it"):
        fresh.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert lora_trainer(tmp_path, n_epochs=1, save_strategy="steps", save_steps=5).train(resume=True).steps == 10


def test_resume_on_another_number_of_processes_is_refused(tmp_path, monkeypatch):
    """The global batch is batch_size x gradient_accumulation_steps x processes: resumed on 2
    processes, a 1-process run's step 4 silently became another position in the data, of another
    schedule (10 steps an epoch became 5), with the same config."""
    from minipeft import distributed

    interrupted(tmp_path, 4, n_epochs=1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    more = lora_trainer(tmp_path, save_strategy="steps", save_steps=1, n_epochs=1)
    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state.json: written by 1 process, resumed on 2"):
        more.train(resume=True)
    assert more.step == 0  # nothing restored


def test_a_finished_run_extends_to_more_epochs(tmp_path):
    """As transformers' Trainer, a finished 1-epoch run resumed with n_epochs=2 trains epoch 2: its
    steps, logs, evaluation and checkpoint follow on. The schedule is the new run's, 20 steps with
    ceil(0.1 x 20) = 2 of warm-up: the learning rate climbs back from 0 to where the 20-step schedule
    is at step 10. What changes the steps already run (learning_rate), or shortens the run, is refused."""
    from minipeft.schedule import lr_factor

    options = dict(warmup_ratio=0.1, disable_tqdm=True, report_to="none")
    first = lora_trainer(tmp_path, n_epochs=1, **options).train()
    rows = logged(tmp_path)
    with pytest.raises(ValueError, match=r"learning_rate 0.01 -> 0.02"):
        lora_trainer(tmp_path, n_epochs=2, learning_rate=2e-2, **options).train(resume=True)
    longer = lora_trainer(tmp_path, n_epochs=2, **options)
    result = longer.train(resume=True)
    assert result.steps == 20 and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    extended = logged(tmp_path)
    assert extended[:len(rows)] == rows and [r["step"] for r in extended if "loss" in r] == list(range(1, 21))
    assert [r["step"] for r in extended if "eval_loss" in r] == [10, 20]
    assert [r["epoch"] for r in extended if "eval_loss" in r] == [1.0, 2.0]
    assert [r["lr"] for r in extended if "loss" in r][10:] == pytest.approx(
        [1e-2 * lr_factor("linear", step, 20, 2) for step in range(10, 20)])
    assert result.train_loss == pytest.approx(sum(r["loss"] for r in extended if "loss" in r) / 20)
    assert first.steps == 10 and result.eval["eval_loss"] == extended[-1]["eval_loss"]
    with pytest.raises(ValueError, match=r"checkpoint-20/trainer_state.json: max_steps 0 -> 15: the run would end "
                                         r"at step 15, before the 20 steps its checkpoint's config runs"):
        lora_trainer(tmp_path, n_epochs=2, max_steps=15, **options).train(resume=True)


def test_a_resumed_finished_run_keeps_the_final_evaluations_warning(tmp_path, monkeypatch):
    """eval_steps=4 over 10 steps: the final evaluation (step 10) ran after step 10's checkpoint was
    written, so the warning it raised was in the run's result but not in its checkpoint, and
    resuming the finished run returned its result without it."""
    import minipeft.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "overfitting", lambda evals: "over-fitting" if len(evals) == 3 else None)
    options = dict(n_epochs=1, eval_steps=4, disable_tqdm=True, report_to="none")
    with pytest.warns(UserWarning, match="over-fitting"):
        first = lora_trainer(tmp_path, **options).train()
    assert first.warnings == ["over-fitting"]
    assert lora_trainer(tmp_path, **options).train(resume=True).warnings == first.warnings


def test_a_diverged_trainer_resumes_in_place(tmp_path):
    """A non-finite step (here one micro-batch of 2, a transient NaN) left the gradients it had
    accumulated in .grad: train(resume=True) on the same Trainer added every later step's to them,
    and diverged again at once. Resumed, the run ends as if the NaN had never happened."""
    from minipeft.trainer import TrainingDiverged

    options = dict(save_strategy="steps", save_steps=2, batch_size=2, gradient_accumulation_steps=2,
                   disable_tqdm=True, report_to="none")
    clean = lora_trainer(tmp_path / "clean", **options)
    clean.train()
    t = lora_trainer(tmp_path / "resumed", **options)
    real, calls = t._nll, []

    def once_nan(examples):
        calls.append(1)
        return real(examples) * (float("nan") if len(calls) == 11 else 1.0)  # step 6's first micro-batch

    t._nll = once_nan
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*checkpoint-4"):
        t.train()
    assert t.train(resume=True).steps == 20
    for a, b in zip(clean.params, t.params):
        assert torch.equal(a, b)

"""The demo's job settings point at the shipped model and the bundled data, for every task; its
output directory is replaced only when it holds a previous demo run; a one-step demo runs the
whole flow where `device` says. (`make demo` itself is the README's main command, not a test.)"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minipeft import demo, job
from minipeft.cli import main
from minipeft.demo import RECORD, TASKS_FILE, claim_output_dir, demo_config, summary_table
from minipeft.job import DEFAULT_MODEL


@pytest.mark.parametrize("task", sorted(json.loads(TASKS_FILE.read_text())))
def test_demo_config_uses_shipped_model_and_bundled_data(task):
    cfg, spec = demo_config(task, "runs/x")
    assert Path(cfg.train_file).is_file() and Path(cfg.test_file).is_file()
    assert Path(cfg.model) == DEFAULT_MODEL and (DEFAULT_MODEL / "config.json").is_file()
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.1)  # the outline's LoRA config
    assert spec["metric"] in spec["metrics"]


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        demo_config("poetry", "runs/x")


def test_summary_table_lists_every_metric():
    s = {"metrics": ["exact_match"], "before": {"exact_match": 0.0, "loss": 3.0, "perplexity": 20.0},
         "after": {"exact_match": 0.9, "loss": 0.5, "perplexity": 1.6}, "trainable": 10, "total": 1000,
         "train_seconds": 60, "tokens_per_s": 900, "wall_seconds": 100, "steps": 50}
    table = summary_table(s)
    assert "| exact_match | 0.000 | 0.900 |" in table and "(1.00%)" in table and "50 steps" in table
    s["metrics"] = ["rougeL", "bleu"]  # the style task's: BLEU is 0-100 beside 0-1 metrics, and says so
    s["before"].update(rougeL=0.1, bleu=12.5)
    s["after"].update(rougeL=0.8, bleu=61.0)
    table = summary_table(s)
    assert "| rougeL | 0.100 | 0.800 |" in table and "| bleu (0-100) | 12.500 | 61.000 |" in table


def test_a_directory_that_is_not_a_demo_run_is_refused_untouched(tmp_path, capsys):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "important.txt").write_text("keep")
    assert main(["demo", "--output-dir", str(precious)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minipeft demo: error: --output-dir") and str(precious) in err and "\n" not in err
    assert (precious / "important.txt").read_text() == "keep" and (precious / "sub").is_dir()
    assert sorted(p.name for p in precious.iterdir()) == ["important.txt", "sub"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match="not a previous demo run"):
        claim_output_dir(a_file)
    assert a_file.read_text() == "keep"


def test_an_output_dir_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    # It was write_atomic's NotADirectoryError traceback (PermissionError for an unwritable place).
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    assert main(["demo", "--output-dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minipeft demo: error: --output-dir {blocker / 'run'}: cannot be created")
    assert "\n" not in err
    assert blocker.read_text() == "keep"


@pytest.mark.parametrize("record", [json.dumps({"name": "my app demo"}), "not json", None])
def test_a_demo_json_alone_does_not_make_a_demo_run(tmp_path, record):
    """Only the demo's record beside only what a run writes: a user's folder with a demo.json of its own,
    or a demo run a user added files to, is refused untouched; so is a symlink to a demo run."""
    project = tmp_path / "project"
    (project / "checkpoint-3").mkdir(parents=True)
    (project / RECORD).write_text(record or json.dumps({"finished": True}))
    (project / "important.py").write_text("keep")
    with pytest.raises(ValueError, match="not a previous demo run"):
        claim_output_dir(project)
    assert (project / "important.py").read_text() == "keep" and (project / RECORD).is_file()
    (project / "important.py").unlink()
    link = tmp_path / "link"
    link.symlink_to(project)
    with pytest.raises(ValueError, match="not a previous demo run"):
        claim_output_dir(link)
    assert project.is_dir()


def test_a_previous_demo_run_is_replaced_and_a_new_or_empty_directory_used(tmp_path):
    """What `make demo` reruns into: a finished run (its demo.json, job config, adapter) starts over."""
    previous = tmp_path / "demo"
    (previous / "adapter").mkdir(parents=True)
    (previous / "job_config.json").write_text("{}")
    (previous / "checkpoint-2400").mkdir()
    (previous / RECORD).write_text(json.dumps({"task": "json_extract", "finished": True}))
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (previous, empty, tmp_path / "new" / "run"):
        claim_output_dir(out)
        assert [p.name for p in out.iterdir()] == [RECORD]  # run_job then finds no job_config.json
        assert json.loads((out / RECORD).read_text()) == {"finished": False}


def test_a_one_step_demo_runs_the_whole_flow_where_device_says(two_gpus, tmp_path, monkeypatch, capsys):
    """The demo's flow on 3 test examples and one training step, asked for cuda:1 on a stand-in
    two-GPU machine: the base model for the "before" evaluation, the job's and the tuned model for
    the "after" one are each loaded there (the loads are recorded, then done on the CPU), and the
    job directory holds what the README lists."""
    test_file = tmp_path / "test.jsonl"
    spec = json.loads(TASKS_FILE.read_text())["json_extract"]
    lines = (job.REPO / spec["test"]).read_text().splitlines()[:3]
    test_file.write_text("\n".join(lines) + "\n")
    config = demo.demo_config
    monkeypatch.setattr(demo, "demo_config", lambda task, out: (
        replace(config(task, out)[0], test_file=str(test_file), max_steps=1, device="cuda:1"), config(task, out)[1]))
    asked, evaluated, evaluate = [], [], demo.evaluate

    def load_spy(real):
        def load(path, **kw):
            asked.append(kw["device"])
            return real(path, **{**kw, "device": "cpu"})
        return load

    def evaluate_spy(model, *args, **kw):
        evaluated.append(type(model).__name__)
        return evaluate(model, *args, **kw)

    monkeypatch.setattr(demo, "load_pretrained", load_spy(demo.load_pretrained))
    monkeypatch.setattr(job, "load_pretrained", load_spy(job.load_pretrained))
    monkeypatch.setattr(demo, "evaluate", evaluate_spy)
    out = tmp_path / "demo"
    summary = demo.run_demo("json_extract", str(out), samples=2)
    assert asked == [torch.device("cuda", 1)] * 3 and two_gpus[-1] == torch.device("cuda", 1)
    assert evaluated == ["Transformer", "PeftModel"]  # before, after
    assert summary["finished"] and summary["steps"] == 1 and set(summary["before"]) >= set(spec["metrics"])
    assert json.loads((out / RECORD).read_text()) == summary
    for name in ("report.md", "samples.md", "job_config.json", "metrics.jsonl", "loss_curve.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    table = summary_table(summary)
    report = (out / "report.md").read_text()
    assert table in capsys.readouterr().out and table in report
    assert "LoRA r=8, lora_alpha=32, lora_dropout=0.1 (the outline's config) on all-linear" in report
    assert demo.TARGETS_WHY in report and "The trainer's diagnostics: " in report
    # The fine-tuned model's files name its adapter; the base model's name none.
    assert json.loads((out / "eval_before" / "metrics.json").read_text())["adapter"] is None
    assert json.loads((out / "eval_after" / "metrics.json").read_text())["adapter"] == str(out / "adapter")
    assert f"adapter: `{out / 'adapter'}`" in (out / "samples.md").read_text()
    assert "adapter" not in (out / "eval_before" / "samples.md").read_text()


def test_a_negative_samples_count_is_refused_before_any_work(tmp_path, capsys):
    # It was refused only by write_report, after the base model's whole evaluation, the output
    # directory already claimed.
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as raised:
        main(["demo", "--samples", "-1", "--output-dir", str(out)])
    assert raised.value.code == 2 and "--samples: must be >= 0, got -1" in capsys.readouterr().err
    assert not out.exists()

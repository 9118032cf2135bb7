"""The demo's job settings point at the shipped model and the bundled data, for every task; its
output directory is replaced only when it holds a previous demo run."""
import json
from pathlib import Path

import pytest

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

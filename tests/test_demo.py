"""The demo's job settings point at the shipped model and the bundled data, for every task."""
import json
from pathlib import Path

import pytest

from minipeft.demo import TASKS_FILE, demo_config, summary_table
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

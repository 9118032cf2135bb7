"""The `minipeft` command's answer to user errors: one line naming the file, key or flag and what
was expected, a non-zero exit status, no traceback (minipeft/cli.py's USER_ERRORS, the checks of
TrainConfig and the argparse types)."""
import json
import sys

import pytest

from minipeft import train_cli
from minipeft.cli import main
from minipeft.trainer import TrainingDiverged


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("settings,message", [
    ({"learning_rate": "fast"}, "learning_rate='fast' (expected a finite number)"),
    ({"bf16": "false"}, "bf16='false' (expected true or false)"),
    ({"batch_size": 2.5}, "batch_size=2.5 (expected an integer)"),
    ({"n_epochs": "three"}, "n_epochs='three' (expected an integer)"),
    ({"logging_steps": None}, "logging_steps=None (expected an integer)"),
    ({"lora_alpha": -4}, "lora_alpha=-4.0 (expected > 0"),
    ({"method": "full", "bf16": True}, "bf16=True (expected false with method='full'"),
])
def test_train_with_a_bad_value_prints_one_line(tmp_path, capsys, settings, message):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"train_file": "train.jsonl", **settings}))
    assert main(["train", "--config", str(job)]) == 2
    assert f"minipeft train: error: {job}: invalid training config: {message}" in one_line_error(capsys)


def test_train_with_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("train_file: train.jsonl\nlearning_rate: {2e-4\n")
    assert main(["train", "--config", str(job)]) == 2
    assert f"minipeft train: error: {job}: invalid YAML at line 3 column 1: " in one_line_error(capsys)


def test_train_with_a_directory_as_config(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory; expected a JSON or YAML job file" in one_line_error(capsys)


def test_a_diverged_run_prints_its_message(tmp_path, capsys, monkeypatch):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"train_file": "train.jsonl", "output_dir": str(tmp_path / "out")}))
    message = "loss became nan at step 3: training stopped. The learning rate (0.0002) may be too large."

    def diverge(cfg, resume=False):
        raise TrainingDiverged(message)

    monkeypatch.setattr(train_cli, "run_job", diverge)
    assert main(["train", "--config", str(job)]) == 2
    assert one_line_error(capsys) == f"minipeft train: error: {message}\n"


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "-3"), ("--max-new-tokens", "0"), ("--top-k", "0")])
def test_generate_refuses_a_count_below_one(capsys, flag, value):
    with pytest.raises(SystemExit) as e:  # argparse: before the model loads
        main(["generate", "--ids", "1,2", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_generate_refuses_a_top_p_outside_0_1(capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ids", "1,2", "--top-p", value])
    assert e.value.code == 2
    assert f"argument --top-p: must be in [0, 1], got {float(value)}" in capsys.readouterr().err


def test_platform_without_its_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: importing it raises
    assert main(["platform"]) == 2
    assert "minipeft platform: error: minipeft platform needs uvicorn: pip install -e '.[platform]'" \
        in one_line_error(capsys)

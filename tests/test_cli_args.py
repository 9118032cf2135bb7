"""Arguments of `minipeft merge`, `pretrain` and `count-params` that used to pass unchecked: each is
refused when the arguments are parsed, or before any model or corpus is loaded, with one line that
names the flag, and exit status 2."""
import json
import math

import pytest
import torch

from minipeft import LoraConfig, get_peft_model, load_pretrained
from minipeft.cli import main
from minipeft.job import DEFAULT_MODEL
from minipeft.templates import TEMPLATE_FILE, get_template, load_template, save_template
from conftest import save_tiny_base


def usage_error(capsys, argv) -> str:
    """argparse's refusal of argv: exit status 2, its message (one line after the usage)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test: the errors below must come before it."""
    import minipeft.job

    monkeypatch.setattr(minipeft.job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


# --- merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_merge_refuses_a_max_diff_that_is_not_a_finite_non_negative_number(tmp_path, capsys, value):
    """NaN turned the check off (every `diff > nan` is False: any merge was written); a negative value
    refused every merge, a perfect one included ("0.00e+00 > -1e+00")."""
    err = usage_error(capsys, ["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m"),
                               "--max-diff", value])
    assert f"argument --max-diff: must be a finite number >= 0, got {value}" in err


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny base and a LoRA adapter saved as a job saves it: with its chat template and tokenizer."""
    root = tmp_path_factory.mktemp("merge")
    base = save_tiny_base(root / "base")
    model = get_peft_model(load_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(root / "adapter")
    save_template(root / "adapter", get_template("chatml"))
    return base, root / "adapter"


@pytest.mark.parametrize("which", ["--base", "--adapter"])
def test_merge_refuses_to_write_over_its_base_or_adapter(base_and_adapter, tmp_path, capsys, no_model_load, which):
    """--output the base directory replaced the base with the merged model (the adapter, applied to it
    again, then counts twice); the adapter directory got a model's files mixed into it."""
    import shutil

    base, adapter = (shutil.copytree(d, tmp_path / d.name) for d in base_and_adapter)
    target = {"--base": base, "--adapter": adapter}[which]
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    output = str(target) + "/."  # another spelling of the same directory
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", output]) == 2
    err = capsys.readouterr().err
    assert f"minipeft merge: error: --output {output}: is the {which} directory; " in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_merge_refuses_to_write_over_the_shipped_model(tmp_path, capsys, no_model_load):
    """Without --base the base is the shipped model: an --output there replaced it for every command."""
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(DEFAULT_MODEL)]) == 2
    assert f"--output {DEFAULT_MODEL}: is the --base directory" in capsys.readouterr().err


def test_merged_checkpoint_keeps_the_adapters_chat_template(base_and_adapter, tmp_path):
    """eval and the platform read the template from the model directory when no adapter is given: the
    merged model, without chat_template.json, was prompted in "plain" instead of the trained template."""
    base, adapter = base_and_adapter
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / TEMPLATE_FILE).read_bytes() == (adapter / TEMPLATE_FILE).read_bytes()
    assert load_template(tmp_path / "m").name == "chatml"


# --- pretrain --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "0", "must be a finite number > 0, got 0"),  # trained 1 step
    ("--epochs", "-1", "must be a finite number > 0, got -1"),  # trained 1 step
    ("--epochs", "nan", "must be a finite number > 0, got nan"),  # "cannot convert float NaN to integer"
    ("--max-minutes", "-1", "must be a finite number > 0, got -1"),  # after the corpus and a timing run
    ("--max-minutes", "nan", "must be a finite number > 0, got nan"),
    ("--threads", "0", "must be >= 1, got 0"),  # ignored
    ("--threads", "-1", "must be >= 1, got -1"),  # torch's RuntimeError, a traceback
])
def test_pretrain_refuses_a_bad_length_or_thread_count(tmp_path, capsys, flag, value, message):
    err = usage_error(capsys, ["pretrain", "--corpus", str(tmp_path / "none.txt"), "--output", str(tmp_path / "m"),
                               flag, value])
    assert f"argument {flag}: {message}" in err
    assert not (tmp_path / "m").exists()


def test_pretrain_refuses_tokenizer_with_init(tmp_path, capsys):
    """--init continues a model with its own tokenizer: a --tokenizer beside it was silently ignored."""
    err = usage_error(capsys, ["pretrain", "--corpus", str(tmp_path / "c.txt"), "--output", str(tmp_path / "m"),
                               "--init", str(tmp_path / "a"), "--tokenizer", str(tmp_path / "b")])
    assert "argument --tokenizer: not allowed with argument --init" in err


def test_pretrain_checks_where_it_writes_before_the_corpus_is_built(tmp_path, capsys, monkeypatch):
    """--save-corpus naming a directory was IsADirectoryError, a traceback; an --output that cannot be
    written failed only after the corpus had been extracted (seconds to minutes of HTML)."""
    import minipeft.pretrain_cli

    monkeypatch.setattr(minipeft.pretrain_cli, "build_corpus", lambda *a: pytest.fail("the corpus was built"))
    (tmp_path / "taken").write_text("")
    args = ["pretrain", "--html-dir", str(tmp_path), "--steps", "1"]
    assert main([*args, "--output", str(tmp_path / "m"), "--save-corpus", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"minipeft pretrain: error: --save-corpus {tmp_path}: is a directory; expected a file to write\n"
    assert main([*args, "--output", str(tmp_path / "taken")]) == 2
    assert f"error: --output {tmp_path / 'taken'}: exists and is not a directory" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "m"), "--save-corpus", str(tmp_path / "taken" / "c.txt")]) == 2
    assert f"error: --save-corpus {tmp_path / 'taken' / 'c.txt'}: cannot be created" in capsys.readouterr().err


# --- count-params ----------------------------------------------------------------------------------
def test_count_params_reads_target_modules_with_spaces(capsys):
    """"q_proj, v_proj" (as one writes a list) counted q_proj only: " v_proj" matched no module, silently."""
    counts = []
    for targets in ("q_proj,v_proj", "q_proj, v_proj", " q_proj ,v_proj,"):
        assert main(["count-params", "--preset", "smollm2-135m", "--target-modules", targets]) == 0
        counts.append(capsys.readouterr().out)
    assert counts[0] == counts[1] == counts[2] and "trainable params: 460,800 ||" in counts[0]

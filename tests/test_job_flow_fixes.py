"""Job-flow mistakes that passed without a word: a key of another method's block, evaluation on the
training file, an output_dir inside the base model, an empty target_modules found out only after the
model loaded, a demo folder a killed run left temporaries in, and generation that ran past the context
of a prefix- or prompt-tuned model."""
import json
import re
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

import minipeft.evaluate as ev
from minipeft import ModelConfig, Transformer, demo, job
from minipeft.cli import main
from minipeft.demo import RECORD, claim_output_dir
from minipeft.files import staging_dir, temp_target
from minipeft.peft_model import get_peft_model
from minipeft.prompt_learning import PrefixTuningConfig, PromptTuningConfig
from minipeft.train_config import TrainConfig
from test_job import base_dir, data_file, job_config  # noqa: F401  (fixtures)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: these jobs must be refused before it."""
    monkeypatch.setattr(job, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(demo, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


# --- 1. a key of another method's block ---------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"method": "prefix", "lora_rank": 8},
     "lora_rank is a LoRA setting (method 'lora' or 'qlora'); this job's method is 'prefix', which would ignore it"),
    ({"method": "prompt", "r": 16}, "r is a LoRA setting"),
    ({"method": "lora", "num_virtual_tokens": 10},
     "num_virtual_tokens is a prefix or prompt tuning setting (method 'prefix' or 'prompt'); this job's method "
     "is 'lora'"),
    ({"bottleneck_size": 32}, "bottleneck_size is an adapter setting (method 'adapter'); this job's method is "
                              "'lora' (the default)"),
    ({"method": "full", "target_modules": "all-linear", "use_rslora": True},
     "target_modules is a LoRA setting (method 'lora' or 'qlora'); use_rslora is a LoRA setting (method 'lora' or "
     "'qlora'); this job's method is 'full', which would ignore them"),
])
def test_a_key_of_another_methods_block_is_refused_by_name(settings, message, tmp_path, capsys):
    """A prefix job given lora_rank trained a prefix and ignored the rank: the job file's keys are
    the settings its author meant to apply, so one its method ignores is an error naming it."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        TrainConfig.load(path, refuse_ignored=True)
    assert main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_methods_own_keys_and_a_complete_record_are_taken(tmp_path):
    """Each method's own block passes; so does a record of every setting (job_config.json, the
    platform's train_config.json: to_dict's output, which holds every block), and so does load
    without refuse_ignored (the platform's worker reads its train_config.json so)."""
    for settings in ({"method": "qlora", "r": 4, "target_modules": ["q_proj"]},
                     {"method": "prefix", "num_virtual_tokens": 4}, {"method": "adapter", "bottleneck_size": 8,
                                                                     "adapter_placement": "pfeiffer"}):
        (tmp_path / "job.json").write_text(json.dumps(settings))
        assert TrainConfig.load(tmp_path / "job.json", refuse_ignored=True).method == settings["method"]
    record = TrainConfig(method="prefix", num_virtual_tokens=4).to_dict()
    (tmp_path / "job_config.json").write_text(json.dumps(record))
    assert TrainConfig.load(tmp_path / "job_config.json", refuse_ignored=True).to_dict() == record
    (tmp_path / "job.json").write_text(json.dumps({"method": "prefix", "lora_rank": 8}))
    assert TrainConfig.load(tmp_path / "job.json").lora_rank == 8


@pytest.mark.parametrize("text, message", [
    ("test_file: held.jsonl\ntest_ratio: 0.2\n",
     "test_ratio is used only without a test file (it splits train_file); this job's test_file 'held.jsonl' is "
     "the test split, which would ignore test_ratio: remove one of them"),
    ("validation_file: held.jsonl\ntest_ratio: 0.2\n", "this job's validation_file 'held.jsonl'"),
])
def test_test_ratio_beside_a_test_file_is_refused(text, message, tmp_path, capsys):
    """test_ratio splits train_file only when no test_file is given: beside one, the job trained on
    all of train_file and never read test_ratio, without a word."""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        TrainConfig.load(path, refuse_ignored=True)
    assert main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    # Either key alone is taken; so is a complete record (job_config.json) and test_file: null.
    for alone in ("test_file: held.jsonl\n", "test_ratio: 0.2\n", "test_file: null\ntest_ratio: 0.2\n"):
        path.write_text(alone)
        TrainConfig.load(path, refuse_ignored=True)
    record = TrainConfig(test_file="held.jsonl", test_ratio=0.2).to_dict()
    (tmp_path / "job_config.json").write_text(json.dumps(record))
    assert TrainConfig.load(tmp_path / "job_config.json", refuse_ignored=True).to_dict() == record


# --- 2. test_file is train_file ------------------------------------------------------------------
def test_evaluating_on_the_training_file_warns(base_dir, data_file, tmp_path, no_model_load):
    """test_file naming train_file (here through another spelling of the path) scored the model on
    the data it trained on: its eval loss measured memory, not generalization."""
    other_spelling = data_file.parent / ".." / data_file.parent.name / data_file.name
    with pytest.warns(UserWarning, match=re.escape(f"test_file {other_spelling} is train_file {data_file}")):
        job.check_job(job_config(base_dir, data_file, tmp_path / "job", test_file=str(other_spelling)))
    held_out = tmp_path / "test.jsonl"
    held_out.write_text(data_file.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job.check_job(job_config(base_dir, data_file, tmp_path / "job", test_file=str(held_out)))


# --- 3. output_dir inside the base model ---------------------------------------------------------
def test_an_output_dir_in_the_base_models_folder_is_refused(base_dir, data_file, tmp_path, monkeypatch,
                                                            no_model_load):
    """A job written into the model's folder mixed its files with the model's (an adapter/ and
    checkpoints beside model.safetensors); the folder itself would be overwritten in place."""
    before = sorted(p.name for p in base_dir.iterdir())
    for out in (base_dir, base_dir / "job", base_dir / "runs" / ".." / "job"):
        with pytest.raises(ValueError, match=re.escape(
                f"output_dir {out}: inside the base model's folder {base_dir}; ")):
            job.run_job(job_config(base_dir, data_file, out))
    # The demo too, before it claims the folder (its demo.json) and evaluates the base model.
    config = demo.demo_config
    monkeypatch.setattr(demo, "demo_config", lambda task, out: (replace(config(task, out)[0], model=str(base_dir)),
                                                                config(task, out)[1]))
    with pytest.raises(ValueError, match=re.escape(f"--output-dir {base_dir / 'demo'}: inside the base model's "
                                                   f"folder {base_dir}")):
        demo.run_demo("json_extract", str(base_dir / "demo"))
    assert sorted(p.name for p in base_dir.iterdir()) == before


# --- 4. a demo killed mid-write ------------------------------------------------------------------
def killed_mid_write(path):
    """Run write_atomic(path) in a process that dies between two chunks, as a kill leaves it."""
    code = ("import os, sys\nfrom minipeft.files import write_atomic\n"
            "def chunks():\n    yield b'{'\n    os._exit(0)\n"
            "write_atomic(sys.argv[1], chunks())\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)


def test_temp_target_names_what_a_leftover_temporary_was_for(tmp_path):
    killed_mid_write(tmp_path / "demo.json")
    staging_dir(tmp_path / "checkpoint-3")
    assert sorted(temp_target(p.name) for p in tmp_path.iterdir()) == ["checkpoint-3", "demo.json"]
    for name in ("demo.json", ".demo.json", ".hidden.tmp", ".notes.txt.tmp", ".a.tmp12"):
        assert temp_target(name) is None, name


def test_a_demo_killed_mid_write_can_be_rerun(tmp_path, capsys):
    """A demo killed mid-write left write_atomic's .demo.json.*.tmp or a checkpoint's staging folder
    in its directory, and every rerun refused it as "not a previous demo run". The temporaries of
    the files a run writes are a killed run's debris: removed, and said so."""
    previous = tmp_path / "demo"
    (previous / "adapter").mkdir(parents=True)
    (previous / RECORD).write_text(json.dumps({"finished": False}))
    killed_mid_write(previous / RECORD)  # the final record, cut short
    staging_dir(previous / "checkpoint-8")  # a checkpoint being saved
    first_write = tmp_path / "first"  # killed writing its first demo.json: nothing else there
    killed_mid_write(first_write / RECORD)
    for out in (previous, first_write):
        debris = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        claim_output_dir(out)
        assert [p.name for p in out.iterdir()] == [RECORD]
        said = capsys.readouterr().out
        assert f"--output-dir {out}: removed temporary files of a run killed mid-write: {', '.join(debris)}" in said


def test_other_hidden_files_still_protect_a_folder(tmp_path):
    """Only the temporaries of a run's own files are debris: another hidden file, or a temporary of
    a file the demo does not write, is someone's; the folder is refused untouched, debris included."""
    for name in (".env", ".notes.txt.abcd1234.tmp"):
        out = tmp_path / name.strip(".")
        out.mkdir()
        killed_mid_write(out / RECORD)
        (out / name).write_text("keep")
        names = sorted(p.name for p in out.iterdir())
        with pytest.raises(ValueError, match="not a previous demo run"):
            claim_output_dir(out)
        assert sorted(p.name for p in out.iterdir()) == names


# --- 5. generation room after virtual tokens -----------------------------------------------------
@pytest.mark.parametrize("tuning", [PromptTuningConfig, PrefixTuningConfig])
def test_replies_stop_at_the_context_after_the_virtual_tokens(tuning):
    """A prefix- or prompt-tuned model reads num_virtual_tokens positions before the prompt: replies
    counted from the prompt alone ran 4 positions past max_position_embeddings, where the base never
    trained (evaluate of a platform prefix job, `minipeft eval` of a prompt adapter)."""
    torch.manual_seed(0)
    base = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    model = get_peft_model(base, tuning(num_virtual_tokens=4)).eval()
    replies = ev.generate_replies(model, [[1] * 10, [1] * 7], stop_ids=[], pad_id=0, max_new_tokens=10 ** 5,
                                  batch_size=2, progress=False)
    assert [len(ids) for ids, _ in replies] == [2, 2]  # 4 virtual + 10 prompt + 2 = 16
    with pytest.raises(ValueError, match=re.escape("a prompt of 12 tokens after 4 virtual tokens fills the model's "
                                                   "context of 16 tokens")):
        ev.generate_replies(model, [[1] * 12], stop_ids=[], pad_id=0, max_new_tokens=1, batch_size=1, progress=False)


# --- 6. an empty target_modules ------------------------------------------------------------------
@pytest.mark.parametrize("empty", [[], ""])
def test_an_empty_target_modules_is_refused_as_parsed(empty, base_dir, data_file, tmp_path, no_model_load):
    """target_modules [] (or "", a regular expression no module name matches) was refused only by
    find_targets, once the model had loaded."""
    with pytest.raises(ValueError, match=re.escape(f"target_modules={empty!r} (expected a non-empty list of module "
                                                   "names, a regular expression or 'all-linear')")):
        job.run_job(job_config(base_dir, data_file, tmp_path / "job", target_modules=empty))
    assert not (tmp_path / "job").exists()

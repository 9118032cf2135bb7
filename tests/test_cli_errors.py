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


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test: the errors below must come before it (minutes on a real model)."""
    import minipeft.generate_cli
    import minipeft.job

    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the error")

    monkeypatch.setattr(minipeft.job, "load_pretrained", load)
    monkeypatch.setattr(minipeft.generate_cli, "load_pretrained", load)


def test_train_without_train_file_says_it_is_required(tmp_path, capsys, no_model_load):
    """The default "" used to reach the data loader: "error: : cannot read: Is a directory"."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"output_dir": str(tmp_path / "out")}))
    assert main(["train", "--config", str(job)]) == 2
    assert "minipeft train: error: train_file is required" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_train_into_a_file_names_output_dir(tmp_path, capsys, no_model_load):
    """It used to be a FileExistsError traceback, after the model had loaded."""
    (tmp_path / "train.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    (tmp_path / "taken").write_text("")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"train_file": str(tmp_path / "train.jsonl")}))
    assert main(["train", "--config", str(job), "--output-dir", str(tmp_path / "taken")]) == 2
    assert f"error: output_dir {tmp_path / 'taken'}: exists and is not a directory" in one_line_error(capsys)


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_merge_and_eval_into_a_file_name_output(command, tmp_path, capsys, no_model_load):
    """Both were tracebacks (NotADirectoryError, FileExistsError), after the model had loaded."""
    (tmp_path / "taken").write_text("")
    (tmp_path / "test.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    args = {"merge": ["--adapter", str(tmp_path / "adapter")], "eval": ["--data", str(tmp_path / "test.jsonl")]}
    taken = tmp_path / "taken"
    for output, why in ((taken, "exists and is not a directory"),
                        (taken / "x", f"cannot be created: {taken} exists and is not a directory")):
        assert main([command, *args[command], "--output", str(output)]) == 2
        assert f"minipeft {command}: error: --output {output}: {why}" in one_line_error(capsys)


@pytest.mark.parametrize("ids,bad", [("1,99999", "99999"), ("1,-5", "-5")])
def test_generate_refuses_an_id_outside_the_vocabulary(capsys, no_model_load, ids, bad):
    """It used to be `IndexError: index out of range in self` from the embedding lookup."""
    from minipeft.checkpoint import read_config
    from minipeft.job import DEFAULT_MODEL

    vocab = read_config(DEFAULT_MODEL).vocab_size
    assert main(["generate", "--ids", ids]) == 2
    assert (f"minipeft generate: error: --ids: token id {bad} is outside the model's vocabulary of {vocab} "
            f"(ids 0 to {vocab - 1})") in one_line_error(capsys)
    assert main(["generate", "--ids", "1,x"]) == 2
    assert "minipeft generate: error: --ids: 'x' is not an integer token id" in one_line_error(capsys)


def test_count_params_with_an_unknown_preset_lists_the_names(capsys):
    """The KeyError it used to raise printed its message in quotes: error: "unknown preset 'nope'; ..."."""
    with pytest.raises(SystemExit) as e:
        main(["count-params", "--preset", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "\"" not in err
    assert "argument --preset: invalid choice: 'nope' (choose from 'llama-2-13b', 'llama-2-7b'," in err


@pytest.mark.parametrize("argv,message", [
    (["--method", "full", "--r", "16"], "--r applies to --method lora or qlora, not full: it would be ignored"),
    (["--bottleneck-size", "32"], "--bottleneck-size applies to --method adapter, not lora"),
    (["--method", "prefix", "--target-modules", "all-linear"], "--target-modules applies to --method lora or qlora"),
])
def test_count_params_refuses_a_flag_of_another_method(capsys, argv, message):
    """A flag of another method was ignored: --method full --r 16 counted full fine-tuning, silently."""
    assert main(["count-params", "--preset", "llama-2-7b", *argv]) == 2
    assert message in one_line_error(capsys)


def test_count_params_defaults_still_apply(capsys):
    assert main(["count-params", "--preset", "llama-2-7b"]) == 0
    assert "trainable params: 4,194,304" in capsys.readouterr().out  # r 8 on q_proj, v_proj: PEFT's README line


@pytest.mark.parametrize("command", ["check", "report"])
def test_data_template_without_a_tokenizer_is_refused(tmp_path, capsys, command):
    """--template measures token lengths; without --tokenizer it was ignored."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    assert main(["data", command, str(path), "--template", "chatml"]) == 2
    assert "--template chatml renders examples into tokens: it needs --tokenizer DIR" in one_line_error(capsys)


@pytest.mark.parametrize("flag,value", [("--vocab-size", "0"), ("--character-coverage", "0"),
                                        ("--character-coverage", "nan"), ("--character-coverage", "1.5")])
def test_tokenizer_train_checks_its_numbers_as_parsed(tmp_path, capsys, flag, value):
    """They reached SentencePiece, whose errors name no flag ("[(trainer_spec.vocab_size()) > (0)]")."""
    args = ["tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "tok"),
            "--vocab-size", "300", flag, value]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--training-file", "--validation-file"])
def test_job_create_with_a_directory_says_so(tmp_path, capsys, flag):
    # Refused before any request: no server listens on the port.
    files = {"--training-file": "file-abc", flag: str(tmp_path)}
    args = [a for f, v in files.items() for a in (f, v)]
    assert main(["job", "--server", "http://127.0.0.1:9", "create", "--model", "tiny", *args]) == 2
    assert f"minipeft job create: error: {tmp_path}: is a directory; {flag} takes a JSONL file" in one_line_error(capsys)


def test_job_create_with_one_file_as_training_and_validation_data_says_so(tmp_path, capsys, monkeypatch):
    """Uploaded twice, it became two ids the server could not tell apart; refused before any request."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    assert main(["job", "--server", "http://127.0.0.1:9", "create", "--model", "tiny", "--training-file", "a.jsonl",
                 "--validation-file", str(tmp_path / "a.jsonl")]) == 2
    given = (tmp_path / "a.jsonl").resolve()
    assert f"minipeft job create: error: {given} is given as both --training-file and --validation-file" \
        in one_line_error(capsys)


def test_generate_refuses_a_reply_past_the_context_and_a_broken_prompt(capsys, no_model_load):
    """700 new tokens after the prompt ran past the shipped model's 512 positions, into garbage; an
    unpaired surrogate in the prompt was sentencepiece's C++ cast error. Both fail before the weights load."""
    from minipeft.checkpoint import read_config
    from minipeft.job import DEFAULT_MODEL

    context = read_config(DEFAULT_MODEL).max_position_embeddings
    assert main(["generate", "--ids", "1,2,3", "--max-new-tokens", str(context)]) == 2
    assert (f"--max-new-tokens {context}: the prompt (3 tokens) + {context} exceeds the model's context of {context} "
            f"tokens; use at most {context - 3}") in one_line_error(capsys)
    assert main(["generate", "--prompt", "a\ud83d", "--max-new-tokens", "2"]) == 2
    assert "error: the text holds an unpaired surrogate '\\ud83d' at character 1" in one_line_error(capsys)


def test_a_reader_closing_the_output_early_ends_the_command_quietly():
    """`minipeft job status ID | head -1` ended with a BrokenPipeError traceback once head exited.
    The pipe's read end is closed before the command writes, so every write fails as it would then."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "minipeft", "count-params", "--preset", "llama-2-7b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 1, err  # Python's status for EPIPE, as its documentation's recipe gives
    assert err == "", "no traceback, nor the 'Exception ignored' of a flush at exit"


def _unread_command(body: str) -> tuple[int, str]:
    """Run a command `x` whose func has `body` (it prints, then fails) under cli.main, in a process whose
    stdout the reader has closed: (exit status, stderr). Its stdout is buffered, as a user's is, so the
    print fills the buffer and the flush at the end meets the closed pipe."""
    import os
    import subprocess

    code = ("import argparse, minipeft.cli as cli\n"
            "parser = cli.build_parser()\n"
            "sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))\n"
            f"def x(args):\n{body}"
            "sub.add_parser('x').set_defaults(func=x)\n"
            "cli.build_parser = lambda: parser\n"
            "raise SystemExit(cli.main(['x']))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(120), err


def test_a_crash_after_the_reader_closed_the_output_keeps_its_traceback():
    """The flush that finds a closed pipe ran in a `finally`: its BrokenPipeError replaced any exception in
    flight, so a crash (a bug, not a user error) ended with status 1 and nothing on stderr."""
    status, err = _unread_command("    print('some output')\n    raise RuntimeError('a bug')\n")
    assert status != 0 and "RuntimeError: a bug" in err


@pytest.mark.parametrize("closed", ["stderr", "stdout and stderr"])
def test_a_user_error_no_one_reads_keeps_its_status_2(tmp_path, closed):
    """`minipeft train --config job.yaml 2>&1 | head -0`: the error message met a closed pipe, and its
    BrokenPipeError turned the status into 1, a crash's. Both pipes are closed by the reader before
    the command writes; stdout is read when open, to show it stays empty."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "minipeft", "train", "--config", str(tmp_path / "nope.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stderr.close()
    if closed == "stderr":
        assert proc.stdout.read() == b""
    else:
        proc.stdout.close()
    assert proc.wait(120) == 2


def test_a_user_error_after_output_no_one_reads_keeps_its_status_2():
    """`minipeft job create ... | head -0`: output printed (buffered), then a user error, its message on
    the terminal: the flush that met the closed stdout returned 1 in place of the error's 2."""
    status, err = _unread_command("    print('uploaded train.jsonl')\n    raise ValueError('validation.jsonl: missing')\n")
    assert (status, err) == (2, "minipeft x: error: validation.jsonl: missing\n")


@pytest.mark.parametrize("name", ["job.json", "job.yaml"])
def test_a_job_file_that_is_not_utf8_names_the_file(tmp_path, capsys, name):
    """It was "error: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte": no file."""
    job = tmp_path / name
    job.write_bytes(b'\xff\xfe{"train_file": "t.jsonl"}')  # a UTF-16 byte-order mark, as Notepad saves
    assert main(["train", "--config", str(job)]) == 2
    assert f"minipeft train: error: {job}: not valid UTF-8 (invalid start byte at byte 0)" in one_line_error(capsys)


def test_tokenizer_train_checks_its_input_and_output_paths_first(tmp_path, capsys):
    """--output naming a file was a FileExistsError traceback, after training; an --input folder
    was called "missing"."""
    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "c.txt")
    (tmp_path / "taken").write_text("")
    args = ["tokenizer", "train", "--vocab-size", "300", "--input"]
    assert main([*args, str(corpus), "--output", str(tmp_path / "taken")]) == 2
    assert f"minipeft tokenizer train: error: --output {tmp_path / 'taken'}: exists and is not a directory" \
        in one_line_error(capsys)
    assert main([*args, str(tmp_path), "--output", str(tmp_path / "tok")]) == 2
    assert f"error: {tmp_path}: is a directory; train_tokenizer reads UTF-8 text files" in one_line_error(capsys)
    assert not (tmp_path / "tok").exists()


def test_an_empty_tokenizer_model_is_named(tmp_path, capsys):
    """sentencepiece loads b"" without error: the empty file (a cut download) surfaced as "this tokenizer
    has bos_id=None" in data check, and as an IndexError traceback in pretrain --tokenizer."""
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "d.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    assert main(["data", "check", str(tmp_path / "d.jsonl"), "--max-length", "8", "--tokenizer", str(tmp_path)]) == 2
    assert f"error: {tmp_path / 'tokenizer.model'}: not a SentencePiece model (the file is empty)" \
        in capsys.readouterr().err.splitlines()[-1]


def test_generate_refuses_a_seed_past_64_bits(capsys, no_model_load):
    """It was "error: Overflow when unpacking long long" (torch's), after the model had loaded."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ids", "1,2", "--seed", str(2**63)])
    assert e.value.code == 2
    assert f"argument --seed: must be in [0, {2**63 - 1}], got {2**63}" in capsys.readouterr().err


def test_pretrain_with_a_directory_as_corpus_says_so(tmp_path, capsys):
    """It was called "missing"."""
    assert main(["pretrain", "--corpus", str(tmp_path), "--output", str(tmp_path / "m"), "--steps", "1"]) == 2
    assert f"error: {tmp_path}: is a directory; expected a UTF-8 corpus file" in one_line_error(capsys)


def test_pretrain_with_a_bad_tokenizer_fails_before_the_run_writes(tmp_path, capsys):
    """The tokenizer was loaded inside the run: its error left OUTPUT.failed (a metrics.jsonl) behind."""
    (tmp_path / "c.txt").write_text("some text\n")
    assert main(["pretrain", "--corpus", str(tmp_path / "c.txt"), "--output", str(tmp_path / "m"), "--steps", "1",
                 "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "nope/tokenizer.model: missing; a SentencePiece model directory needs tokenizer.model" \
        in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_pretrain_with_heads_that_do_not_fit_fails_before_the_corpus_is_read(tmp_path, capsys):
    """The architecture was checked only once the corpus was read and a tokenizer trained, and the error
    left OUTPUT.failed behind. The corpus here does not even exist: the settings are refused first."""
    assert main(["pretrain", "--corpus", str(tmp_path / "absent.txt"), "--output", str(tmp_path / "m"),
                 "--num-attention-heads", "8", "--num-key-value-heads", "3"]) == 2
    assert "invalid pretraining settings: num_attention_heads (8) must be a multiple of num_key_value_heads (3)" \
        in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_outputs_under_a_file_are_named_before_any_work(tmp_path, capsys):
    """data check --output under a file failed at the write as "cannot write: File exists"; datasets
    build wrote nothing but said so only at its first file."""
    (tmp_path / "afile").write_text("")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    assert main(["data", "check", str(data), "--drop-invalid", "--output", str(tmp_path / "afile" / "x.jsonl")]) == 2
    assert f"--output {tmp_path / 'afile' / 'x.jsonl'}: its folder {tmp_path / 'afile'}: exists and is not a " \
        "directory" in one_line_error(capsys)
    assert main(["datasets", "build", "--output", str(tmp_path / "afile")]) == 2
    assert f"minipeft datasets build: error: --output {tmp_path / 'afile'}: exists and is not a directory" in one_line_error(capsys)


@pytest.mark.parametrize("server", ["127.0.0.1:8000", ""])
def test_job_with_a_server_that_is_not_a_url_names_the_flag(capsys, server):
    """It was urllib's "error: unknown url type: '127.0.0.1:8000/api/v1/fine-tunes?'"."""
    assert main(["job", "--server", server, "list"]) == 2
    assert f"minipeft job list: error: --server {server!r}: expected an http:// or https:// URL" in one_line_error(capsys)

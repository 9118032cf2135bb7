"""Every option of every `minipeft` subcommand (but `job` and `platform`, tested beside the platform)
given each bad value of its kind, with otherwise valid arguments: found by walking cli.build_parser(),
so a new option is tried as soon as it exists (a string option must be classified in PATHS or TEXT
first: test_every_option_is_classified says so). Each case must be refused with exit status 2 and one
line that names the option, before any model loads or work starts (the work is replaced by a
tripwire), within seconds, writing nothing."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from minipeft import cli
from minipeft.job import DEFAULT_MODEL

SKIPPED = {"job", "platform"}  # the platform's commands: tests/test_platform*.py
HUGE = str(10**30)
NUMBERS = ["-1", "0", HUGE, "nan", "inf", "abc", ""]
# Numbers whose 0 means something (greedy, no samples, no hold-out, no decay): not a bad value there.
ZERO_OK = {("generate", "--temperature"), ("generate", "--top-p"), ("generate", "--seed"), ("merge", "--max-diff"),
           ("eval", "--samples"), ("eval", "--seed"), ("demo", "--samples"), ("data split", "--seed"),
           ("datasets build", "--seed"), ("pretrain", "--seed"), ("pretrain", "--intermediate-size"),
           ("pretrain", "--eval-fraction"), ("pretrain", "--copy-fraction"), ("pretrain", "--drill-fraction"),
           ("pretrain", "--warmup-ratio"), ("pretrain", "--weight-decay"), ("pretrain", "--adam-beta2")}
# Numbers whose huge value means something: no limit (the context, the vocabulary, the file end bound it
# instead: eval cuts replies at the context, top-k past the vocabulary is off as in transformers), a
# near-uniform draw (transformers takes any finite temperature), a tolerance the user chose (--force is
# looser still), or a long run the user asked for.
HUGE_OK = {("generate", "--temperature"), ("generate", "--top-k"), ("merge", "--max-diff"),
           ("data check", "--max-length"), ("demo", "--samples"), ("eval", "--samples"),
           ("eval", "--max-new-tokens"), ("eval", "--batch-size"), ("pretrain", "--steps"), ("pretrain", "--epochs"),
           ("pretrain", "--max-minutes")}
# How each path option is used: read a file, read a directory, write a directory, write a file.
PATHS = {
    ("generate", "--model"): "dir", ("tokenizer train", "--input"): "file",
    ("tokenizer train", "--output"): "out_dir", ("data check", "files"): "file", ("data check", "--tokenizer"): "dir",
    ("data check", "--output"): "out_file", ("data check", "--rejects"): "out_file", ("data report", "file"): "file",
    ("data report", "--test"): "file", ("data report", "--output"): "out_dir", ("data report", "--tokenizer"): "dir",
    ("data split", "file"): "file", ("data split", "--output-dir"): "out_dir", ("train", "--config"): "file",
    ("train", "--output-dir"): "out_dir", ("merge", "--base"): "dir", ("merge", "--adapter"): "dir",
    ("merge", "--output"): "out_dir", ("demo", "--output-dir"): "out_dir", ("eval", "--model"): "dir",
    ("eval", "--adapter"): "dir", ("eval", "--data"): "file", ("eval", "--output"): "out_dir",
    ("pretrain", "--html-dir"): "dir", ("pretrain", "--corpus"): "file", ("pretrain", "--output"): "out_dir",
    ("pretrain", "--save-corpus"): "out_file", ("pretrain", "--tokenizer"): "dir", ("pretrain", "--init"): "dir",
    ("datasets build", "--output"): "out_dir",
}
# Other strings, with their bad values.
TEXT = {
    ("generate", "--prompt"): [], ("generate", "--ids"): ["", "abc", "-1", "1,,2"],
    ("generate", "--device"): ["gpu", "", "cuda:x"], ("eval", "--device"): ["gpu", "", "cuda:x"],
    ("pretrain", "--device"): ["gpu", "", "cuda:x"], ("pretrain", "--lr-scheduler-type"): ["nope", ""],
    ("tokenizer train", "--special-tokens"): [""], ("count-params", "--target-modules"): ["", ","],
    ("demo", "--task"): ["nope", ""],
}
# What a command needs besides the option under test (its values are valid); options that need another.
REQUIRED = {
    "generate": {"--ids": "1,2"},
    "tokenizer train": {"--input": "{corpus}", "--output": "{cwd}/tok", "--vocab-size": "300"},
    "data check": {"files": "{data}"}, "data report": {"file": "{data}"}, "data split": {"file": "{data}"},
    "train": {"--config": "{job}"}, "merge": {"--adapter": "{adapter}", "--output": "{cwd}/merged"},
    "count-params": {"--preset": "smollm2-135m"}, "demo": {"--output-dir": "{cwd}/demo"},
    "eval": {"--data": "{data}", "--output": "{cwd}/eval"},
    "pretrain": {"--corpus": "{corpus}", "--output": "{cwd}/model"}, "datasets build": {"--output": "{cwd}/ds"},
}
COMPANIONS = {
    ("data check", "--max-length"): {"--tokenizer": "{model}"}, ("data check", "--tokenizer"): {"--max-length": "8"},
    ("data check", "--template"): {"--tokenizer": "{model}", "--max-length": "8"},
    ("data check", "--output"): {"--drop-invalid": None},
    ("data check", "--rejects"): {"--drop-invalid": None, "--output": "{cwd}/clean.jsonl"},
    ("data report", "--template"): {"--tokenizer": "{model}"},
    **{("count-params", flag): {"--method": "adapter"} for flag in ("--bottleneck-size", "--placement")},
    ("count-params", "--num-virtual-tokens"): {"--method": "prefix"},
}


def options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.Action, argparse.ArgumentParser]]:
    """(command, action, its parser) of every option and positional argument that takes a value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if not (path == () and name in SKIPPED):
                    yield from options(sub, (*path, name))
        elif action.nargs != 0:  # flags (store_true, --help) take no value
            yield " ".join(path), action, parser


def flag(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def is_number(action: argparse.Action) -> bool:
    """Whether the option reads a number (int, float or an argtypes number type): what it makes of "1"."""
    try:
        return action.type is not None and isinstance(action.type("1"), (int, float))
    except (ValueError, argparse.ArgumentTypeError):  # a type of text (--device) that refuses "1"
        return False


def bad_values(command: str, action: argparse.Action) -> list[tuple[str, str]]:
    """(kind, value) pairs; a path value is a placeholder the test fills in with its workspace."""
    key = (command, flag(action))
    if key in PATHS:
        return [(PATHS[key], v) for v in {
            "file": ["{missing}", "{a_dir}", ""], "dir": ["{missing}", "{a_file}", ""],
            "out_dir": ["{a_file}", "{a_file}/x", ""], "out_file": ["{a_dir}", "{a_file}/x", ""]}[PATHS[key]]]
    if key in TEXT:
        return [("text", v) for v in TEXT[key]]
    if action.choices:
        return [("choice", "not-a-choice")]
    if is_number(action):
        return [("number", v) for v in NUMBERS if not (v == "0" and key in ZERO_OK or v == HUGE and key in HUGE_OK)]
    return []


PARSER = cli.build_parser()
CASES = [pytest.param(command, flag(action), kind, value, id=f"{command}:{flag(action)}={value}")
         for command, action, _ in options(PARSER) for kind, value in bad_values(command, action)]


def test_every_option_is_classified():
    """A string option's bad values depend on its use: a new one must say which it is."""
    unknown = [(c, flag(a)) for c, a, _ in options(PARSER)
               if not is_number(a) and not a.choices and (c, flag(a)) not in PATHS and (c, flag(a)) not in TEXT]
    assert not unknown, f"classify these options in PATHS or TEXT: {unknown}"


class WorkStarted(BaseException):
    """Raised by the tripwires: not an Exception, so no handler on the way can take it for a user error."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "a_dir").mkdir()
    (root / "a_file").write_text("not a directory\n")
    (root / "adapter").mkdir()
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(20)))
    (root / "corpus.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(50)))
    (root / "job.json").write_text(json.dumps({"train_file": str(data), "output_dir": str(root / "job_out")}))
    return {"missing": str(root / "missing"), "a_dir": str(root / "a_dir"), "a_file": str(root / "a_file"),
            "adapter": str(root / "adapter"), "data": str(data), "corpus": str(root / "corpus.txt"),
            "job": str(root / "job.json"), "model": str(DEFAULT_MODEL), "root": str(root)}


@pytest.fixture
def tripwires(monkeypatch):
    """Whatever loads a model, trains, generates or builds: reached, the case was accepted (or
    checked too late)."""
    import sentencepiece as spm

    import minipeft.datasets
    import minipeft.demo
    import minipeft.eval_cli
    import minipeft.generate_cli
    import minipeft.job
    import minipeft.pretrain_cli
    import minipeft.tokenizer
    import minipeft.train_cli

    def trip(*args, **kwargs):
        raise WorkStarted

    for module, name in [(minipeft.job, "load_pretrained"), (minipeft.generate_cli, "load_pretrained"),
                         (minipeft.demo, "load_pretrained"), (minipeft.train_cli, "load_pretrained"),
                         (minipeft.eval_cli, "evaluate"), (minipeft.pretrain_cli, "pretrain"),
                         (spm.SentencePieceTrainer, "train"), (minipeft.datasets, "build_datasets")]:
        monkeypatch.setattr(module, name, trip)


def argv_for(command: str, action: argparse.Action, value: str, paths: dict[str, str]) -> list[str]:
    given = {**REQUIRED[command], **COMPANIONS.get((command, flag(action)), {})}
    group = next((g for g in PARSER_GROUPS[command] if action in g._group_actions), None)
    for other in group._group_actions if group else ():  # one of a mutually exclusive group at a time
        given.pop(flag(other), None)
    given[flag(action)] = value
    argv = command.split()
    for name, v in given.items():
        v = v if v is None else v.format(**paths)
        if name.startswith("-"):
            argv += [name] if v is None else [name, v]
        else:
            argv.append(v)
    return argv


PARSER_GROUPS = {c: p._mutually_exclusive_groups for c, _, p in options(PARSER)}


def tree(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


def refused(argv: list[str], roots: tuple[Path, ...], capsys) -> tuple[str, str]:
    """Run argv; (stderr's last line, stdout) of a refusal with status 2, no traceback, nothing written,
    within 5 s. argparse's refusal is the usage then one line; the command's, one line alone."""
    before = tree(*roots)
    start = time.perf_counter()
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
    except WorkStarted:
        pytest.fail(f"{argv}: accepted (the work started)")
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert status == 2, f"{argv}: status {status}, stderr {err!r}"
    lines = err.splitlines()
    assert lines and (len(lines) == 1 or lines[0].startswith("usage:")), err
    assert tree(*roots) == before, f"{argv}: the refused command wrote files"
    assert seconds < 5, f"{argv}: refused after {seconds:.1f} s"
    return lines[-1], out


@pytest.mark.parametrize("command,option,kind,value", CASES)
def test_a_bad_value_is_refused_at_once(workspace, tripwires, tmp_path, monkeypatch, capsys,
                                        command, option, kind, value):
    monkeypatch.chdir(tmp_path)  # default outputs (eval_results, datasets, runs/demo) land here, if anywhere
    action = next(a for c, a, _ in options(PARSER) if c == command and flag(a) == option)
    paths = {**workspace, "cwd": str(tmp_path)}
    line, _ = refused(argv_for(command, action, value, paths), (Path(workspace["root"]), tmp_path), capsys)
    if line.startswith(f"minipeft {command}: error: argument "):  # argparse's: it names the option
        name = option if option.startswith("-") else action.metavar or option
        assert line.startswith(f"minipeft {command}: error: argument {name}"), line
    else:
        assert line.startswith(f"minipeft {command}: error: "), line
        shown = value.format(**paths)
        named = (option, action.dest + "=", shown or option)  # the flag, the setting it fills, or the value
        assert any(n in line for n in named), f"names none of {named}: {line}"


# The cases the sweep found, each kept with its message (the comment: what it did before).
FOUND = [
    (["merge", "--adapter", "{adapter}", "--output", "{cwd}/m", "--base", ""],
     "argument --base: expected a model directory, got an empty string"),  # merged into the shipped model
    (["merge", "--adapter", "{missing}", "--output", "{cwd}/m"],
     "error: {missing}: no such adapter directory"),  # after the base had loaded
    (["merge", "--adapter", "{adapter}", "--output", "{cwd}/m", "--base", "{a_file}"],
     "error: {a_file}/config.json: missing"),  # after reading the adapter
    (["eval", "--data", "{data}", "--output", "{cwd}/e", "--adapter", "{a_file}"],
     "error: {a_file}: is a file; expected the adapter directory"),  # after the base had loaded
    (["eval", "--data", "{data}", "--output", "{cwd}/e", "--model", ""],
     "argument --model: expected a model directory, got an empty string"),  # the shipped model, silently
    # random.Random(-1) draws as random.Random(1): the seeds of random draws alias
    (["eval", "--data", "{data}", "--output", "{cwd}/e", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["data", "split", "{data}", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["datasets", "build", "--output", "{cwd}/ds", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["data", "split", "{data}", "--output-dir", ""],
     "argument --output-dir: expected a directory, got an empty string"),  # split into the current directory
    (["data", "report", "{data}", "--output", ""],
     "argument --output: expected a directory, got an empty string"),  # the report in the current directory
    (["train", "--config", "{job}", "--output-dir", ""],
     "argument --output-dir: expected a directory, got an empty string"),  # ignored: trained into the job's
    (["tokenizer", "train", "--input", "{corpus}", "--output", "", "--vocab-size", "300"],
     "argument --output: expected a directory, got an empty string"),  # trained into the current directory
    (["tokenizer", "train", "--input", "{corpus}", "--output", "{cwd}/t", "--vocab-size", "300", "--special-tokens", ""],
     "argument --special-tokens: expected a token, got an empty string"),  # handed to SentencePiece
    (["data", "check", "{data}", "--drop-invalid", "--output", "{a_dir}"],
     "error: --output {a_dir}: is a directory; expected a file to write"),  # after the check
    (["data", "check", "{data}", "--drop-invalid", "--output", "{cwd}/c.jsonl", "--rejects", "{a_dir}"],
     "error: --rejects {a_dir}: is a directory; expected a file to write"),  # after c.jsonl was written
    (["count-params", "--preset", "smollm2-135m", "--r", HUGE],
     "argument --r: must be in [1, 2147483647], got " + HUGE),  # torch's TypeError, a traceback
    (["count-params", "--preset", "smollm2-135m", "--method", "prefix", "--num-virtual-tokens", "0"],
     "argument --num-virtual-tokens: must be >= 1, got 0"),  # the config's error, naming no flag
    (["count-params", "--preset", "smollm2-135m", "--target-modules", ","],
     "error: --target-modules ',': no module name"),  # "target_modules=[] matched no module"
    (["pretrain", "--corpus", "{corpus}", "--output", "{cwd}/m", "--threads", HUGE],
     "argument --threads: must be in [1, 2147483647], got " + HUGE),  # "Overflow when unpacking long long"
    (["generate", "--ids", "1", "--device", ""],
     "argument --device: expected auto, cpu, cuda or cuda:N, got ''"),  # "device=''", naming no flag
]


@pytest.mark.parametrize("argv,message", FOUND, ids=[" ".join(a) for a, _ in FOUND])
def test_what_the_sweep_found_is_refused_by_name(workspace, tripwires, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    paths = {**workspace, "cwd": str(tmp_path)}
    line, out = refused([a.format(**paths) for a in argv], (Path(workspace["root"]), tmp_path), capsys)
    assert message.format(**paths) in line
    assert out == ""  # nothing ran before the refusal: no check printed, no model announced

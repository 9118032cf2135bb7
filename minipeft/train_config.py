"""A fine-tuning job's settings, named as in the outline's table and the cloud platform's API.

The outline's core parameters (section 4.1) with its usual values: learning_rate 1e-5..5e-5
(full fine-tuning; LoRA tolerates ~10x more), epochs 3-5, batch_size 4-32, warmup_ratio 0.1,
weight_decay 0.01. A job file is JSON or YAML holding these keys; an unknown key, a value of
the wrong type (each key takes its annotation's type: `true` is no integer, `2.5` no batch size)
or an out-of-range value is an error that names the key, before any work starts; so is a key
given twice (YAML and JSON parsers keep the last one silently), and in `minipeft train`'s job file
a key the job would ignore: one of another method's block (lora_rank in a prefix job: METHOD_BLOCKS),
or test_ratio beside a test_file (check_ignored_keys).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .distributed import DEVICES
from .files import existing_file, parse_json, read_text

METHODS = ("lora", "qlora", "adapter", "prefix", "prompt", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt")
ALIASES = {"epochs": "n_epochs", "r": "lora_rank", "training_file": "train_file", "validation_file": "test_file"}
_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
          list: "a list of strings", type(None): "null"}
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit (the trainer seeds seed + epoch); the platform API's bound too
# Each method block: its name as errors say it -> (the methods that read it, its keys); another method
# ignores them.
METHOD_BLOCKS = {"a LoRA": (("lora", "qlora"), ("lora_rank", "lora_alpha", "lora_dropout", "use_rslora",
                                                 "target_modules")),
                 "an adapter": (("adapter",), ("bottleneck_size", "adapter_placement")),
                 "a prefix or prompt tuning": (("prefix", "prompt"), ("num_virtual_tokens",))}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error at its second line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}  # key -> its line
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then a key of them again is YAML's way to override one
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # super() reports it
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first[key] + 1}); keep one",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _finite_float(value: Any) -> Optional[float]:
    """`value` as a finite float if it is a number or text that reads as one, else None.

    Text is accepted because PyYAML reads YAML 1.1, where a float needs a dot: the job file's
    `learning_rate: 2e-4` arrives as the string "2e-4"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _conform(value: Any, hint: Any) -> Any:
    """`value` as the annotation `hint` (bool, int, float, str, list[str], or a Union of them) takes
    it: numbers (or text reading as one) as float for a float, as int for an int if integral;
    TypeError saying what was expected if no arm takes it."""
    arms = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    for arm in arms:
        kind = typing.get_origin(arm) or arm
        if kind is float:
            number = _finite_float(value)
            if number is not None:
                return number
        elif kind is int:  # 1e3 (YAML, JSON) and "42" mean an integer; 2.5 and True do not
            if type(value) is int:
                return value  # as given: a float would round a large seed
            if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):  # as int() reads; "²" is no \d
                return int(value)
            number = _finite_float(value)
            if number is not None and number.is_integer():
                return int(number)
        elif kind is list:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        elif type(value) is kind:  # not isinstance: True is an int to isinstance
            return value
    raise TypeError(" or ".join(_KINDS[typing.get_origin(arm) or arm] for arm in arms))


def _refuse(bad: list[str]) -> None:
    if bad:
        raise ValueError("invalid training config: " + "; ".join(bad))


def check_method_keys(written: dict[str, str], method: str, where: str, default: bool = False) -> None:
    """Refuse the keys (as written -> their field) of method blocks other than `method`'s;
    default: the file sets no method, so `method` is TrainConfig's."""
    bad = [f"{key} is {block} setting (method {' or '.join(map(repr, methods))})"
           for key, name in written.items() for block, (methods, names) in METHOD_BLOCKS.items()
           if name in names and method not in methods]
    if bad:
        them = "them" if len(bad) > 1 else "it"
        raise ValueError(f"{where}: {'; '.join(bad)}; this job's method is {method!r}"
                         f"{' (the default)' if default else ''}, which would ignore {them}")


def check_ignored_keys(written: dict[str, str], cfg: "TrainConfig", where: str, default: bool = False) -> None:
    """Refuse the keys (as written -> their field) that `cfg` would ignore: another method's block
    (check_method_keys; default as there), and test_ratio beside a test_file, which replaces the split
    test_ratio would take off train_file (job.load_data)."""
    check_method_keys(written, cfg.method, where, default)
    named = {name: key for key, name in written.items()}
    if cfg.test_file and "test_ratio" in named:
        raise ValueError(f"{where}: {named['test_ratio']} is used only without a test file (it splits train_file); "
                         f"this job's {named['test_file']} {cfg.test_file!r} is the test split, which would ignore "
                         f"{named['test_ratio']}: remove one of them")


@dataclass
class TrainConfig:
    # --- data and model ---
    train_file: str = ""  # JSONL, instruction or conversation format
    test_file: Optional[str] = None  # held-out JSONL; None: split test_ratio off train_file
    test_ratio: float = 0.1  # the outline's 10-20% test split, used when test_file is None
    model: str = ""  # base model directory (Hugging Face layout); "" = the shipped base model
    output_dir: str = "runs/job"
    template: str = "plain"  # chat template: plain | chatml | llama2
    label_mode: str = "assistant"  # which turns are supervised: assistant | last | all
    max_length: int = 512  # tokens per example; longer ones are dropped (and counted)
    packing: bool = False  # examples share rows of max_length tokens, each seeing itself only; batch_size: rows
    # --- method ---
    method: str = "lora"  # lora | qlora | adapter | prefix | prompt | full
    lora_rank: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    use_rslora: bool = False  # scale the update by lora_alpha / sqrt(lora_rank), not / lora_rank (rsLoRA)
    target_modules: Optional[Union[list[str], str]] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bottleneck_size: int = 64  # adapter
    adapter_placement: str = "houlsby"  # adapter: houlsby | pfeiffer
    num_virtual_tokens: int = 20  # prefix / prompt tuning
    init_adapter: Optional[str] = None  # continue from this saved adapter (same method and shapes)
    # --- optimization ---
    learning_rate: float = 2e-4
    n_epochs: int = 3
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides n_epochs; the schedule spans them)
    batch_size: int = 8  # examples per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.1  # fraction of steps with a linear warm-up from 0
    weight_decay: float = 0.01  # AdamW decoupled decay, on matrices only
    adam_beta1: float = 0.9  # AdamW's moment decays (Hugging Face's names and defaults)
    adam_beta2: float = 0.999  # 0.95 is common in pretraining: the second moment forgets faster
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    seed: int = 42
    bf16: bool = False  # base weights in bfloat16 (adapters stay float32)
    device: str = "auto"  # auto (a GPU if torch sees one, else the CPU) | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False
    # --- logging, evaluation, checkpoints ---
    logging_steps: int = 10  # metrics.jsonl gets a row every n steps; its loss is their mean
    eval_steps: int = 0  # 0: evaluate at the end of each epoch only
    eval_batch_size: int = 0  # examples per evaluation forward; 0: batch_size
    save_strategy: str = "epoch"  # epoch | steps | no (no checkpoints: the caller saves the result)
    save_steps: int = 100
    save_total_limit: int = 2  # keep only the newest checkpoints
    report_to: str = "auto"  # auto: TensorBoard event files too when tensorboard is installed | tensorboard | none
    disable_tqdm: bool = False  # no progress bar (logs, services)

    def __post_init__(self) -> None:
        if self.save_strategy is False:  # YAML 1.1 (PyYAML) reads `save_strategy: no`, the documented value, as false
            self.save_strategy = "no"
        hints, bad = typing.get_type_hints(type(self)), []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, _conform(value, hints[f.name]))
            except TypeError as e:
                bad.append(f"{f.name}={value!r} (expected {e})")
        _refuse(bad)  # the ranges below compare values of the right types only
        checks = [
            ("method", self.method in METHODS, f"one of {METHODS}"),
            ("lr_scheduler_type", self.lr_scheduler_type in SCHEDULERS, f"one of {SCHEDULERS}"),
            ("save_strategy", self.save_strategy in ("epoch", "steps", "no"), "'epoch', 'steps' or 'no'"),
            ("report_to", self.report_to in ("auto", "tensorboard", "none"), "'auto', 'tensorboard' or 'none'"),
            ("device", DEVICES.fullmatch(self.device) is not None, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
            ("label_mode", self.label_mode in ("assistant", "last", "all"), "'assistant', 'last' or 'all'"),
            ("adapter_placement", self.adapter_placement in ("houlsby", "pfeiffer"), "'houlsby' or 'pfeiffer'"),
            ("learning_rate", 0 < self.learning_rate < 1, "in (0, 1)"),
            ("n_epochs", self.n_epochs >= 1, ">= 1"),
            ("max_steps", self.max_steps >= 0, ">= 0"),
            ("eval_batch_size", self.eval_batch_size >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("test_ratio", 0 < self.test_ratio < 1, "in (0, 1)"),
            ("max_length", self.max_length >= 2, ">= 2"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("lora_rank", self.lora_rank >= 1, ">= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0: the LoRA update is scaled by lora_alpha / lora_rank"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("logging_steps", self.logging_steps >= 1, ">= 1"),
            ("eval_steps", self.eval_steps >= 0, ">= 0"),
            ("save_steps", self.save_steps >= 1, ">= 1"),
            ("save_total_limit", self.save_total_limit >= 1, ">= 1"),
            ("num_virtual_tokens", self.num_virtual_tokens >= 1, ">= 1"),
            ("bottleneck_size", self.bottleneck_size >= 1, ">= 1"),
            # find_targets would refuse it too, but only once the model has loaded
            ("target_modules", self.target_modules not in ([], ""),
             "a non-empty list of module names, a regular expression or 'all-linear'"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            # "" is the current folder to Path: checkpoints and metrics would land among the user's files
            ("output_dir", str(self.output_dir).strip() != "", "a directory path (\".\" for the current folder)"),
            # The trainer updates weights in their own dtype, with no float32 master copy: a step below
            # half of bf16's spacing (2^-8 of the weight) rounds away; at lr 2e-5 norm gains never move.
            ("bf16", not (self.bf16 and self.method == "full"),
             "false with method='full': bf16 weights keep no float32 master copy, so small updates round "
             "away; use bf16=false, or a PEFT method (lora, qlora, ...) with bf16"),
            ("packing", not (self.packing and self.method in ("prefix", "prompt")),
             "false with method='prefix' or 'prompt': a row's examples would share one set of virtual tokens"),
            ("gradient_checkpointing", not (self.gradient_checkpointing and self.method == "prefix"),
             "false with method='prefix': the prefix is fed through the KV cache, which recomputed layers "
             "do not take"),
        ]
        _refuse([f"{key}={getattr(self, key)!r} (expected {want})" for key, ok, want in checks if not ok])

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config", refuse_ignored: bool = False) -> "TrainConfig":
        """The config of settings `d`; errors name `where`. refuse_ignored: a key the job would ignore
        (check_ignored_keys: lora_rank in a prefix job, test_ratio beside test_file) is an error; a
        record naming every setting (to_dict's: job_config.json) holds every key and is taken whole."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        written: dict[str, str] = {}  # key as written -> its field
        for key, value in d.items():
            name = ALIASES.get(key, key)
            if name not in names:
                raise ValueError(f"{where}: unknown key {key!r}; known keys: {sorted(names | set(ALIASES))}")
            if name in kwargs:
                raise ValueError(f"{where}: {key!r} given twice (it is an alias of {name!r})")
            kwargs[name], written[key] = value, name
        try:
            cfg = cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if refuse_ignored and kwargs.keys() != names:
            check_ignored_keys(written, cfg, where, default="method" not in kwargs)
        return cfg

    @classmethod
    def load(cls, path: Union[str, Path], refuse_ignored: bool = False) -> "TrainConfig":
        """Read a JSON or YAML job file; refuse_ignored as from_dict's."""
        path = existing_file(path, "expected a JSON or YAML job file")
        text = read_text(path)  # once: a pipe (--config <(cat job.yaml)) cannot be read again
        # a pipe's name (/dev/fd/63) has no suffix: YAML unless it opens as a JSON object
        if path.suffix in (".yaml", ".yml") or not (path.is_file() or text.lstrip().startswith("{")):
            try:
                d = yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)  # parse errors carry where they happened
                at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
                raise ValueError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        else:
            d = parse_json(text, path, unique_keys=True)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(d).__name__}")
        return cls.from_dict(d, where=str(path), refuse_ignored=refuse_ignored)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

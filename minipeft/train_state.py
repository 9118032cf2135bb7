"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    checkpoint-<step>/
        adapter/ (PEFT format) or model/ (full fine-tuning, Hugging Face format)
        trainable.safetensors    adapters only: the trainable parameters by name, restored in place
        optimizer.safetensors    AdamW moments and step counts, "<param index>.<name>"
        optimizer.json           its param_groups (learning rates, betas, weight decay)
        rng.safetensors          torch's CPU (and CUDA) generator states, every rank's: dropout
                                 resumes identically
        trainer_state.json       global step, the config, the number of processes, and the progress
                                 the logs and warnings look back on (losses since the last log,
                                 evaluations)

The learning-rate schedule is a pure function of the step and the data order a pure function of
(seed, epoch), so the step is all the position they need. A checkpoint is written into a hidden
temporary directory renamed into place when complete: a run killed mid-save leaves the previous
checkpoint intact. Only safetensors and JSON are read back, never pickle.

Resuming copies the weights into the very parameters the optimizer was built over. The PEFT-format
adapter/ is for users and cannot serve: it may hold computed tensors instead of the parameters
(prefix tuning's folded MLP), and loading it would replace them with new ones the optimizer does
not hold, so that the resumed steps would change nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from . import distributed as dist
from .checkpoint import check_state_dict, load_safetensors, read_state_dict
from .files import json_bytes, read_json, staged_dir, strict_json
from .peft_model import PeftModel

PREFIX = "checkpoint-"
TRAINABLE = "trainable.safetensors"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().clone().contiguous() if torch.is_tensor(v) else torch.tensor(v)
               for i, state in sd["state"].items() for k, v in state.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    """The generator states a checkpoint keeps: the CPU's ("cpu") and every visible GPU's ("cuda<i>"),
    and under torchrun each other rank's own, "rank<k>.cpu" and "rank<k>.cuda" (its current GPU):
    a rank draws its dropout masks from its own generators, which drift apart as the ranks' slices
    differ in shape. A collective: every rank calls it; rank 0 writes what it returns."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if dist.world_size() > 1:
        own = {"cpu": torch.get_rng_state()}
        if dist.backend_is_nccl():
            own["cuda"] = torch.cuda.get_rng_state()
        for key, state in own.items():
            rng.update({f"rank{k}.{key}": s for k, s in enumerate(dist.gather(state)) if k})
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Set this process's generators as rng_states() saw them (a checkpoint without this rank's
    own states gives it rank 0's, as checkpoints written before they were kept did)."""
    k = dist.rank()
    torch.set_rng_state(rng.get(f"rank{k}.cpu", rng["cpu"]))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
        if f"rank{k}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{k}.cuda"])  # its current GPU, cuda:LOCAL_RANK


def save_checkpoint(output_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int, rng: dict[str, torch.Tensor]) -> Path:
    """Write checkpoint-<step> atomically, then delete all but the newest `keep` checkpoints; rng:
    rng_states()."""
    final = output_dir / f"{PREFIX}{step}"
    # Staged hidden (list_checkpoints skips it until it is renamed into place) and on disk before the
    # rename, so the rotation below never deletes the last checkpoint that a power loss would leave whole.
    with staged_dir(final, stale="*") as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp / "adapter")
            save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                      str(tmp / TRAINABLE))
        else:
            model.save_pretrained(tmp / "model")
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_bytes(json_bytes(groups))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_bytes(json_bytes(state))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (hidden temporary ones are unfinished and ignored)."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state saved in checkpoint `path` (read before anything is restored, to check it)."""
    return read_json(path / "trainer_state.json", "it holds the step and config to resume from")


# trainer_state.json's keys that a resume needs (world_size too, where recorded: resumable_state)
STATE_KEYS = frozenset({"step", "warnings", "losses", "loss_sum", "logged", "evals", "config"})


def resumable_state(path: Path, config: dict[str, Any], world: int, steps_per_epoch: int,
                    data: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Checkpoint `path`'s trainer state, once checked against the run that resumes it: its config
    `config` must match but for the settings RESUMABLE names (an error lists each difference) and a
    longer run (LENGTH: its schedule), it must have been written by `world` processes, and on the
    training examples of fingerprint `data` (train_batches.fingerprint), where both say."""
    state, where = read_trainer_state(path), path / "trainer_state.json"
    missing = STATE_KEYS - state.keys()
    if missing:
        raise ValueError(f"{where}: missing {sorted(missing)}: not a checkpoint this trainer can resume "
                         "(written by an older minipeft?): train into a new output_dir")
    # The global batch is batch_size x gradient_accumulation_steps x processes: on another number of
    # processes the same config steps through other batches, by another schedule, from the same step.
    # (Checkpoints written before it was recorded do not say: not checked.)
    if state.get("world_size", world) != world:
        processes = f"process{'es' if state['world_size'] > 1 else ''}"
        raise ValueError(f"{where}: written by {state['world_size']} {processes}, resumed on {world}: the "
                         "global batch (batch_size x gradient_accumulation_steps x processes), and with it the data "
                         f"position and the schedule, would change; resume on {state['world_size']} {processes}")
    # From Python the config names no data file, so only the examples themselves tell another data set
    # (or an edited train_file): resumed, its batches would continue the old run's position and moments.
    if data is not None and state.get("data", data) != data:
        raise ValueError(f"{where}: trained on other data ({state['data']['examples']} examples, sha256 "
                         f"{state['data']['sha256'][:12]}...) than this run's ({data['examples']}, "
                         f"{data['sha256'][:12]}...): resume with the same training examples, or train into a new "
                         "output_dir")
    check_resumable(state["config"], config, where)
    check_length(state["config"], config, steps_per_epoch, where)
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights (in place: the optimizer's parameters), optimizer, RNG from `path`."""
    peft = isinstance(model, PeftModel)
    if not (path / (TRAINABLE if peft else "model")).exists() and (path / ("model" if peft else TRAINABLE)).exists():
        raise ValueError(f"{path}: a checkpoint of {'full fine-tuning' if peft else 'a PEFT adapter'}, but the model "
                         f"to resume is {'a PeftModel' if peft else 'not a PeftModel'}: resume with the model it "
                         "trained, or train into a new output_dir")
    if peft:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tensors = load_safetensors(path / TRAINABLE)
        check_state_dict({n: p.shape for n, p in trainable.items()}, tensors, str(path / TRAINABLE))
        with torch.no_grad():
            for name, tensor in tensors.items():
                trainable[name].copy_(tensor)
    else:
        with torch.no_grad():
            for name, tensor in read_state_dict(path / "model").items():
                model.get_parameter(name).copy_(tensor)
    flat = load_safetensors(path / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = read_json(path / "optimizer.json", "it holds the optimizer's settings to resume with")["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    restore_rng(load_safetensors(path / "rng.safetensors"))


# Settings that change only what is logged, evaluated, saved or shown, or how a step is computed
# but never the weights it produces: a resumed run may change them. Every other key must be the
# checkpoint's. gradient_checkpointing recomputes activations instead of storing them (the same
# numbers): switching it on after an out-of-memory crash is the usual reason to resume. device
# moves the same arithmetic to other hardware (its float rounding aside): a run started on a
# laptop's CPU may go on on a GPU.
# test_file is not among them although a set test_file only feeds evaluation: None splits
# test_ratio off train_file, so setting or clearing it changes the training data; and swapping one
# held-out file for another would mix two eval sets in one run's eval history, which the
# over-fitting diagnostic compares across evaluations.
RESUMABLE = frozenset({"output_dir", "logging_steps", "eval_steps", "eval_batch_size", "save_strategy",
                       "save_steps", "save_total_limit", "report_to", "disable_tqdm", "gradient_checkpointing",
                       "device"})
# The run's length T, max_steps or else n_epochs epochs: a resumed run may lengthen it, to train on
# past the end it was set for (a finished run too), as transformers' Trainer allows. The steps taken
# do not depend on T (the data order is (seed, epoch)'s, the batches the config's); the steps to come
# follow the schedule of the new length T' (the schedule is a function of step and T, warm-up
# ceil(warmup_ratio T') included), so for linear and cosine the learning rate jumps back up from the
# old schedule's end. So does transformers' Trainer, which rebuilds its scheduler for T' and restores
# only its step count, but for its first resumed step, which takes the rate its optimizer saved (0 at
# a finished run's end: tests/test_schedule.py). Shortening is refused (check_length): the steps
# taken were scheduled for the longer run, and may already be past the shorter one's end.
LENGTH = ("max_steps", "n_epochs")
# Files and directories: the same one, however it is written (relative or absolute, "./", symlinks).
# "" and None keep their meaning (the shipped base model; no file).
PATHS = frozenset({"train_file", "test_file", "model", "init_adapter"})
# Lists of module names, whose order means nothing: parameters are found by name.
NAME_SETS = frozenset({"target_modules"})


def _comparable(key: str, value: Any) -> Any:
    if key in PATHS and value:
        return str(Path(value).resolve())
    return sorted(value) if key in NAME_SETS and isinstance(value, list) else value


def check_resumable(saved: dict[str, Any], config: dict[str, Any], where: Path) -> None:
    """Raise if `config` differs from the checkpoint's `saved` config in a key outside RESUMABLE
    and LENGTH (check_length's): resuming would silently mix two runs (another schedule, batch or
    data order; AdamW's settings would even be replaced by the checkpoint's). Paths are compared
    resolved (against the current directory)."""
    config = json.loads(strict_json(config))  # compare as saved: tuples become lists
    changed = [f"{key} {saved.get(key, '(absent)')!r} -> {config.get(key, '(absent)')!r}"
               for key in sorted(saved.keys() | config.keys()) if key not in RESUMABLE and key not in LENGTH
               and _comparable(key, saved.get(key)) != _comparable(key, config.get(key))]
    if changed:
        raise ValueError(f"{where}: cannot resume with a different config (checkpoint -> now): {'; '.join(changed)}; "
                         "restore these values, or train into a new output_dir")


def check_length(saved: dict[str, Any], config: dict[str, Any], steps_per_epoch: int, where: Path) -> None:
    """Raise if `config` runs fewer steps (max_steps, else steps_per_epoch x n_epochs) than the
    checkpoint's `saved` config: a resumed run may be lengthened, not shortened (LENGTH)."""
    def steps(c: dict[str, Any]) -> int:
        return c["max_steps"] or steps_per_epoch * c["n_epochs"]

    if steps(config) < steps(saved):
        changed = ", ".join(f"{key} {saved[key]!r} -> {config[key]!r}" for key in LENGTH if saved[key] != config[key])
        raise ValueError(f"{where}: {changed}: the run would end at step {steps(config)}, before the {steps(saved)} "
                         "steps its checkpoint's config runs; a resumed run may be lengthened (a larger n_epochs or "
                         "max_steps), not shortened: restore these values, or train into a new output_dir")

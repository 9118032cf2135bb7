"""Models a job can start from or a deployment can serve: base models (a name -> a directory, given
to the server) and fine-tuned models (published from a finished job or one of its checkpoints).

Publishing copies the adapter (or, for a full fine-tune, the model) into DATA_DIR/models/<name>/
with its chat template and tokenizer: a model outlives its job's directory and checkpoint rotation.

Continuing a fine-tuned model trains its adapter further (TrainConfig.init_adapter), so the new
job must rebuild the same adapter: the structural settings are inherited from the model's
adapter_config.json, and a LoRA rank, alpha or dropout given that differs is refused with both
values (alpha and dropout are not in the weights; a changed alpha would silently rescale them).
"""
from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..files import staged_dir, temp_target
from ..job import METHOD_BLOCKS
from ..peft_config import PeftConfig
from ..peft_files import unordered
from ..templates import TEMPLATE_FILE, get_template, load_template, save_template
from ..tokenizer import load_tokenizer
from ..train_state import list_checkpoints
from .errors import MODEL_NOT_FOUND, ApiError, not_found
from .store import Store

# training method -> the kind of adapter it saves; a model continues only with its own kind.
FAMILY = {"lora": "LORA", "qlora": "LORA", "adapter": "BOTTLENECK_ADAPTER", "prefix": "PREFIX_TUNING",
          "prompt": "PROMPT_TUNING", "full": "FULL"}
# adapter kind -> {TrainConfig field: adapter_config.json field} a continued job must keep.
INHERITED = {config.peft_type: {key: field for field, key in block.items()} for config, block in METHOD_BLOCKS.items()}
# Held while a model is published, and by Platform.delete_model: a delete then never interleaves with
# a publish under the same name (its folder) or on the deleted model's weights (an adapter on a full fine-tune).
PUBLISHING = threading.Lock()


@dataclass(frozen=True)
class Source:
    """What a model name stands for: its root base model, the weights it runs on, and (for a
    fine-tuned model) its record."""
    base_model: str
    weights_dir: Path
    record: Optional[dict[str, Any]] = None

    @property
    def adapter_dir(self) -> Optional[Path]:
        return Path(self.record["adapter_dir"]) if self.record and self.record["adapter_dir"] else None

    @property
    def method(self) -> Optional[str]:
        return self.record["method"] if self.record else None


def resolve(store: Store, bases: dict[str, Path], name: str) -> Source:
    if name in bases:
        return Source(name, bases[name])
    record = store.get("models", name)
    if record is None:
        raise not_found("model", name, f"base models: {sorted(bases)}; fine-tuned models: GET /api/v1/models",
                        code=MODEL_NOT_FOUND, param="model")
    return Source(record["base_model"], Path(record["weights_dir"]), record)


def trained_template(source: Source) -> Optional[str]:
    """The chat template `source` was trained with (its chat_template.json), which a job on it
    keeps by default; None for a model without one, whose jobs take TrainConfig's default (plain),
    as `minipeft train` and the demo do. Not chatml merely because the tokenizer has <|im_end|>: a
    base model that never learned to emit it (the shipped one) answers until max_tokens."""
    for folder in (source.adapter_dir, source.weights_dir):
        if folder is not None and (folder / TEMPLATE_FILE).is_file():
            return load_template(folder).name
    return None


def remove_partial_models(data_dir: Path) -> None:
    """Delete what a crash left of a publish or a delete in DATA_DIR/models: their hidden staging
    folders (files.staging_dir). Only at start, when neither can be under way; a model's own folder
    is named by NAME, which never starts with a dot."""
    folder = data_dir / "models"
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_dir() and not path.is_symlink() and temp_target(path.name) is not None:
            shutil.rmtree(path, ignore_errors=True)


def continuation(source: Source, method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields that continue `source`'s adapter (empty for a base model or a full
    fine-tune, whose weights simply become the starting model)."""
    if source.adapter_dir is None:
        return {}
    saved = PeftConfig.load(source.adapter_dir)
    kind = saved.peft_type
    if FAMILY[method] != kind:
        allowed = sorted(m for m, k in FAMILY.items() if k == kind)
        raise ApiError(400, f"model {source.record['name']!r} is a {kind} adapter; continue it with a training "
                       f"method of the same kind ({', '.join(allowed)}), or start from its base model "
                       f"{source.base_model!r}", param="training_type")
    saved = saved.to_dict()
    inherited, conflicts = {"init_adapter": str(source.adapter_dir)}, []
    for field, saved_field in INHERITED[kind].items():
        if saved[saved_field] is None:  # unset in the adapter (bottleneck_size beside reduction_factor): the job
            continue                    # takes the adapter's own config (job.check_continuation)
        if field in settings and unordered(settings[field]) != unordered(saved[saved_field]):
            conflicts.append(f"{field}={settings[field]!r} (the model has {saved[saved_field]!r})")
        inherited[field] = saved[saved_field]
    if conflicts:
        raise ApiError(400, f"continuing fine-tuned model {source.record['name']!r} requires the settings it was "
                       f"trained with: {'; '.join(conflicts)}. Leave them out to inherit them.",
                       param="hyper_parameters")
    return inherited


def _copy_atomic(source: Path, dest: Path, template: str, tokenizer_dir: Path) -> None:
    # stale="*": nothing of a leftover at dest (a publish a crash cut short) is kept
    with staged_dir(dest, stale="*") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if not (tmp / TEMPLATE_FILE).is_file():  # a checkpoint saves weights only
            save_template(tmp, get_template(template))
        if not (tmp / "tokenizer.model").is_file():
            load_tokenizer(tokenizer_dir).save_pretrained(tmp)


def publish(store: Store, data_dir: Path, job: dict[str, Any], checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Make a model of a finished job (checkpoint None) or of one of its checkpoints; idempotent."""
    with PUBLISHING:  # one at a time: two requests for one checkpoint must not both copy it
        return _publish(store, data_dir, job, checkpoint)


def _publish(store: Store, data_dir: Path, job: dict[str, Any], checkpoint: Optional[str]) -> dict[str, Any]:
    output = Path(job["config"]["output_dir"])
    source = output
    if checkpoint is not None:
        found = {p.name: p for p in list_checkpoints(output)}
        if checkpoint not in found:
            raise not_found("checkpoint", checkpoint, f"job {job['id']} has {sorted(found) or 'none'}")
        source = found[checkpoint]
    name = f"{job['base_model']}-{job['id']}" + (f"-{checkpoint}" if checkpoint else "")
    existing = store.get("models", name)
    if existing is not None:
        return existing
    kind = "adapter" if (source / "adapter").is_dir() else "model"
    dest = data_dir / "models" / name
    cfg = job["config"]
    if kind == "adapter" and not (Path(cfg["model"]) / "config.json").is_file():  # a deleted full fine-tune's
        raise ApiError(409, f"the weights the adapter of job {job['id']} runs on, model {job['model']!r} "
                       f"({cfg['model']}), are gone (the model was deleted?): nothing was published")
    try:
        _copy_atomic(source / kind, dest, cfg["template"], Path(cfg["model"]))
    except FileNotFoundError as e:  # most likely a checkpoint rotated out (save_total_limit) while it was copied
        raise ApiError(409, f"{checkpoint or 'the final model'} of job {job['id']} could not be copied ({e}); "
                       "if save_total_limit rotated it out meanwhile, list the checkpoints again") from None
    except OSError as e:  # the server's disk (full, read-only, failing): no conflict, nothing the client can fix
        raise ApiError(507, f"{checkpoint or 'the final model'} of job {job['id']} could not be stored on the "
                       f"server ({e}); nothing was published, try again once the data directory can be written"
                       ) from None
    return store.insert("models", {
        "name": name, "job_id": job["id"], "base_model": job["base_model"],
        "weights_dir": cfg["model"] if kind == "adapter" else str(dest),
        "adapter_dir": str(dest) if kind == "adapter" else None, "method": cfg["method"],
        "checkpoint": checkpoint, "created_at": int(time.time())})

"""A fine-tuning job, dataset to adapter: the outline's workflow as one function.

    load base model (on cfg.device) + tokenizer -> read and render the JSONL data (template + loss masks)
    -> hold out the test split (10-20%) -> attach the method -> Trainer -> save the job directory

The job directory holds `job_config.json`, `adapter/` (PEFT format, with chat_template.json; a
full fine-tune writes `model/`), `metrics.jsonl`, `loss_curve.png`, and the checkpoints.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import distributed as dist
from .checkpoint import load_pretrained, read_config
from .data import load_jsonl, split_examples
from .data.check import special_tokens
from .model import Transformer
from .files import check_output_dir, json_bytes, read_json, write_atomic
from .linear4bit import METHODS
from .lora import LoraConfig
from .peft_config import CONFIG_NAME, PeftConfig
from .peft_model import WEIGHTS_NAME, PeftModel, count_parameters, full_finetune, get_peft_model
from .plots import plot_curves
from .templates import ChatTemplate, TooLongError, get_template, save_template
from .tokenizer import Tokenizer, load_tokenizer
from .train_config import TrainConfig
from .trainer import Trainer, TrainResult, read_metrics
from .train_state import check_resumable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "minillama-10m"  # minipeft's own pretrained base model (its README: the card)


def default_model_dir(name: str = "") -> Path:
    return Path(name) if name else DEFAULT_MODEL


def attach_method(model: Transformer, cfg: TrainConfig) -> nn.Module:
    """The model with cfg.method attached (the base is frozen except for full fine-tuning)."""
    if cfg.method == "full":
        return full_finetune(model)
    if cfg.method in ("lora", "qlora"):
        from .lora import LoraConfig

        method = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            use_rslora=cfg.use_rslora, target_modules=cfg.target_modules)
    elif cfg.method == "adapter":
        from .adapter import AdapterConfig

        method = AdapterConfig(bottleneck_size=cfg.bottleneck_size, placement=cfg.adapter_placement)
    elif cfg.method == "prefix":
        from .prompt_learning import PrefixTuningConfig

        method = PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens)
    else:
        from .prompt_learning import PromptTuningConfig

        method = PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens)
    method.base_model_name_or_path = str(default_model_dir(cfg.model))
    return get_peft_model(model, method)


def render_all(examples: Sequence[Any], tok: Tokenizer, template: ChatTemplate, cfg: TrainConfig,
               what: str) -> list[tuple[list[int], list[int]]]:
    """Render examples to (input_ids, labels); longer than max_length -> dropped, and counted."""
    rendered, dropped = [], []
    for ex in examples:
        try:
            rendered.append(tuple(template.render(ex.messages, tok, cfg.label_mode, cfg.max_length)))
        except TooLongError:
            dropped.append(ex.line)
    if dropped:
        print(f"{what}: dropped {len(dropped)} example(s) longer than max_length={cfg.max_length} "
              f"tokens (lines {dropped[:10]}{'...' if len(dropped) > 10 else ''})")
    if not rendered:
        raise ValueError(f"{what}: no example fits max_length={cfg.max_length}")
    return rendered


def continue_from(model: nn.Module, adapter_dir: str) -> None:
    """Start from a saved adapter's weights, trainable: a continued fine-tune, not a fresh one.
    Tensor names and shapes are checked against the attached method (a rank or method mismatch
    names the file); lora_alpha and lora_dropout are not in the weights: check_continuation
    compares those, before the model loads."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"init_adapter={adapter_dir!r} continues a PEFT method; to continue a full "
                         "fine-tune, pass its model directory as model")
    model.load_adapter_weights(adapter_dir, model.active_adapter, is_trainable=True)


def check_continuation(cfg: TrainConfig) -> None:
    """A LoRA job continuing cfg.init_adapter must keep the adapter's lora_alpha and use_rslora
    (its adapter_config.json): the update B A is scaled by lora_alpha / r (rsLoRA: / sqrt(r)), so
    another value changes what the saved weights compute before the first step. lora_dropout must match too, as the
    platform requires (platform/models.py, INHERITED): dropout is not part of the learned function,
    but a continuation trains as its start did, and the job and the platform agree on what it may
    change. The rest (rank, target modules, other methods' sizes) shows in the weights' names and
    shapes, which continue_from checks."""
    if cfg.method not in ("lora", "qlora"):
        return
    saved = PeftConfig.load(cfg.init_adapter)
    if not isinstance(saved, LoraConfig):
        return  # another method's tensors: continue_from names the mismatch
    changed = [f"{key}={getattr(cfg, key)!r} but the adapter has {key}={getattr(saved, key)!r}"
               for key in ("lora_alpha", "lora_dropout", "use_rslora") if getattr(cfg, key) != getattr(saved, key)]
    if changed:
        raise ValueError(f"init_adapter {Path(cfg.init_adapter) / CONFIG_NAME}: {'; '.join(changed)}; a continued "
                         "adapter keeps the settings it was trained with: use the adapter's values")


def check_context(max_length: int, model_dir: Path) -> None:
    """max_length fits the model's context (max_position_embeddings in its config.json; no
    weight is read): the base never saw later positions, so examples longer than it would train
    and be served outside what the model learned, without an error."""
    context = read_config(model_dir).max_position_embeddings
    if max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context: {model_dir / 'config.json'} has "
                         f"max_position_embeddings={context}; use max_length <= {context}")


def check_job(cfg: TrainConfig) -> None:
    """What a job needs beyond TrainConfig's checks of each value, checked against the files
    before the model loads (seconds, not minutes, to an error): a train_file (TrainConfig leaves it
    optional because pretraining has none), a writable output_dir, a max_length within the model's
    context, and an init_adapter trained with the job's settings. Creates nothing."""
    if not cfg.train_file:
        raise ValueError("train_file is required: the JSONL file (instruction or conversation lines) to fine-tune on")
    check_output_dir(cfg.output_dir, "output_dir")
    check_context(cfg.max_length, default_model_dir(cfg.model))
    if cfg.init_adapter:
        check_continuation(cfg)


@dataclass
class JobResult:
    output_dir: Path
    result: TrainResult
    trainable: int
    total: int


def load_base(cfg: TrainConfig, device: Optional[torch.device] = None) -> tuple[Transformer, Tokenizer]:
    """The base model as the job trains it (bf16, NF4 for QLoRA), on device (default: cfg.device
    resolved), and its tokenizer."""
    path = default_model_dir(cfg.model)
    model = load_pretrained(path, dtype=torch.bfloat16 if cfg.bf16 else None,
                            device=device or dist.use_device(cfg.device),
                            quantization="nf4" if cfg.method == "qlora" else None)
    return model, load_tokenizer(path)  # gradient checkpointing: the Trainer switches it on


def run_job(cfg: TrainConfig, resume: bool = False) -> JobResult:
    """Run the whole job; everything it writes lands in cfg.output_dir."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if (out / "job_config.json").exists() and not resume:
        raise ValueError(f"{out} already holds a job: pass --resume to continue it, or choose another output_dir")
    check_job(cfg)
    template = get_template(cfg.template)  # an unknown name fails here, before the model loads
    device = dist.use_device(cfg.device)
    dist.init(device)  # under torchrun: join the other ranks (NCCL on GPUs)
    base, tok = load_base(cfg, device)
    specials = special_tokens(tok)  # content holding one would be encoded as that control token
    train = load_jsonl(cfg.train_file, specials)
    if cfg.test_file:
        test = load_jsonl(cfg.test_file, specials)
    else:
        train, test = split_examples(train, cfg.test_ratio, seed=cfg.seed)
    model = attach_method(base, cfg)
    if cfg.init_adapter:
        continue_from(model, cfg.init_adapter)
    trainer = Trainer(cfg, model, render_all(train, tok, template, cfg, cfg.train_file),
                      render_all(test, tok, template, cfg, cfg.test_file or "test split"), pad_id=tok.pad_id)
    if resume:
        trainer.resume()  # a changed config is an error here, before job_config.json is replaced
        if trainer.step == 0 and (out / "job_config.json").is_file():
            # No checkpoint (save_strategy "no", or cut short before the first): the job starts again, but
            # only as the job it was; a changed config would silently replace it, job_config.json included.
            check_resumable(read_json(out / "job_config.json", "resuming the job"), cfg.to_dict(),
                            out / "job_config.json")
            warnings.warn(f"{out}: no checkpoint to resume from (save_strategy {cfg.save_strategy!r}): "
                          "the job starts again from step 0")
    # Every rank has checked for an existing job before rank 0 writes one; only rank 0 writes.
    dist.barrier()
    if dist.rank() == 0:
        write_atomic(out / "job_config.json", json_bytes(cfg.to_dict()))
    result = trainer.train()
    if dist.rank() == 0:
        save_trained(model, tok, template, out)
        plot_curves(read_metrics(out / "metrics.jsonl"), out / "loss_curve.png",
                    title=f"{cfg.method} on {'/'.join(Path(cfg.train_file).parts[-2:])}")  # the task's folder too
    dist.barrier()  # the other ranks return once the job directory is complete
    return JobResult(out, result, *count_parameters(model))


def save_trained(model: nn.Module, tok: Tokenizer, template: ChatTemplate, out: Path) -> Path:
    """adapter/ (PEFT format) or model/ (full fine-tune), each with the chat template and tokenizer."""
    target = out / ("adapter" if isinstance(model, PeftModel) else "model")
    model.save_pretrained(target)
    save_template(target, template)
    tok.save_pretrained(target)
    return target


QUANTIZATIONS = ("auto", "none", *METHODS)  # --quantization: as recorded, full precision, or a 4-bit method


def base_quantization(adapter: Optional[str], requested: str = "auto") -> Optional[str]:
    """How to load an adapter's base: "nf4" or "none" as requested, or "auto": as the adapter was
    trained, which its file records when minipeft saved it on an NF4 base (QLoRA). A QLoRA adapter
    on the 16/32-bit base computes another function: its ΔW was fitted to the rounded weights."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization {requested!r}: expected one of {QUANTIZATIONS}")
    if requested != "auto":
        return None if requested == "none" else requested
    if adapter is None or not (Path(adapter) / WEIGHTS_NAME).is_file():  # PeftModel's load says what is missing
        return None
    return PeftModel.saved_base_quantization(adapter)


def load_trained(model_dir: Optional[str], adapter: Optional[str], dtype: Optional[torch.dtype] = None,
                 device: Any = "cpu", quantization: str = "auto",
                 log: Callable[[str], Any] = lambda line: None) -> tuple[nn.Module, Tokenizer]:
    """Base model (default: the shipped one) with an optional adapter, for inference; the base is
    loaded as base_quantization(adapter, quantization) says (auto: as the adapter was trained)."""
    base_dir = default_model_dir(model_dir or "")
    quantized = base_quantization(adapter, quantization)
    if quantized:
        why = "the adapter's file records it: trained with QLoRA" if quantization == "auto" else "--quantization"
        log(f"base loaded in {quantized.upper()} ({why})")
    model = load_pretrained(base_dir, dtype=dtype, device=device, quantization=quantized)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), load_tokenizer(base_dir)

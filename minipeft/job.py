"""A fine-tuning job, dataset to adapter: the outline's workflow as one function.

    load base model (on cfg.device) + tokenizer -> read and render the JSONL data (template + loss masks)
    -> hold out the test split (10-20%) -> attach the method -> Trainer -> save the job directory

The job directory holds `job_config.json`, `adapter/` (PEFT format, with chat_template.json; a
full fine-tune writes `model/`), `metrics.jsonl`, `loss_curve.png`, and the checkpoints.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import distributed as dist
from .adapter import AdapterConfig
from .checkpoint import load_pretrained, read_config
from .data import load_jsonl, split_examples
from .data.check import special_tokens
from .model import Transformer
from .files import check_output_dir, json_bytes, read_json, write_atomic
from .linear4bit import METHODS
from .lora import LoraConfig
from .peft_config import CONFIG_NAME, PeftConfig
from .peft_files import unordered
from .peft_model import WEIGHTS_NAME, PeftModel, count_parameters, full_finetune, get_peft_model
from .plots import plot_curves
from .prompt_learning import PrefixTuningConfig, PromptTuningConfig
from .templates import ChatTemplate, TooLongError, get_template, save_template
from .tokenizer import Tokenizer, load_tokenizer
from .train_config import TrainConfig
from .trainer import Trainer, TrainResult, read_metrics
from .train_state import check_resumable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "minillama-10m"  # minipeft's own pretrained base model (its README: the card)
# A job's method block: the settings it gives its method's config, {config field: TrainConfig field}. A continued
# job's block must equal its adapter's (check_continuation); the platform inherits them (platform/models.py).
LORA_BLOCK = {"r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "use_rslora": "use_rslora",
              "target_modules": "target_modules"}
METHOD_BLOCKS: dict[type[PeftConfig], dict[str, str]] = {
    LoraConfig: LORA_BLOCK,
    AdapterConfig: {"bottleneck_size": "bottleneck_size", "placement": "adapter_placement"},
    PrefixTuningConfig: {"num_virtual_tokens": "num_virtual_tokens"},
    PromptTuningConfig: {"num_virtual_tokens": "num_virtual_tokens"},
}
METHOD_CONFIGS = {"lora": LoraConfig, "qlora": LoraConfig, "adapter": AdapterConfig, "prefix": PrefixTuningConfig,
                  "prompt": PromptTuningConfig}


def default_model_dir(name: str = "") -> Path:
    return Path(name) if name else DEFAULT_MODEL


def method_config(cfg: TrainConfig) -> Optional[PeftConfig]:
    """cfg.method's PEFT config, built from cfg's method block (no model needed); None for "full"."""
    if cfg.method == "full":
        return None
    klass = METHOD_CONFIGS[cfg.method]
    return klass(**{field: getattr(cfg, key) for field, key in METHOD_BLOCKS[klass].items()})


def attach_method(model: Transformer, cfg: TrainConfig) -> nn.Module:
    """The model with cfg.method attached (the base is frozen except for full fine-tuning); continuing
    cfg.init_adapter, built as check_continuation says."""
    method = check_continuation(cfg) if cfg.init_adapter else method_config(cfg)
    if method is None:
        return full_finetune(model)
    method.base_model_name_or_path = str(default_model_dir(cfg.model))
    return get_peft_model(model, method)


Rendered = list[tuple[list[int], list[int]]]  # (input_ids, labels) per example


def render_all(examples: Sequence[Any], tok: Tokenizer, template: ChatTemplate, cfg: TrainConfig,
               what: str) -> Rendered:
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
    Tensor names and shapes are checked against the attached method (built as check_continuation
    says, which compares the settings before the model loads)."""
    model.load_adapter_weights(adapter_dir, model.active_adapter, is_trainable=True)


def check_continuation(cfg: TrainConfig) -> PeftConfig:
    """The config to continue cfg.init_adapter with. It must be an adapter (its adapter_config.json) of
    cfg.method's kind: another kind's tensors were found out only after the model loaded, as every
    missing and unexpected tensor name. The adapter is rebuilt from its own config, which holds what a
    job cannot set and what decides its function: LoRA's rank_pattern, alpha_pattern, exclude_modules and
    layers_to_transform (a job's rebuild failed the shape check, or silently rescaled), a bottleneck
    adapter's activation and reduction_factor (rebuilt with ReLU, it computed another function whenever
    the shapes matched); prefix and prompt tuning's own fields (prefix_projection, inits) change nothing
    once their table is loaded, and are kept as saved. A job sets only its method block
    (METHOD_BLOCKS), which must equal the adapter's, each difference named; lora_dropout too, as the
    platform requires (platform/models.py): it is not part of the learned function, but a continuation
    trains as its start did. A block field the adapter leaves None (a bottleneck sized by reduction_factor
    instead) is the adapter's to decide: the job's value is not used, with a warning."""
    method = method_config(cfg)
    if method is None:
        raise ValueError(f"init_adapter={cfg.init_adapter!r} continues a PEFT method; to continue a full "
                         "fine-tune, pass its model directory as model")
    where = Path(cfg.init_adapter) / CONFIG_NAME
    saved = PeftConfig.load(cfg.init_adapter)
    if saved.peft_type != method.peft_type:
        raise ValueError(f"init_adapter {where}: a {saved.peft_type} adapter, but method={cfg.method!r} trains "
                         f"{method.peft_type} adapters: continue it with the method that trained it, or leave "
                         "init_adapter out to start a new adapter")
    block = METHOD_BLOCKS[type(saved)]
    unset = [f"{key}={getattr(cfg, key)!r}" for field, key in block.items() if getattr(saved, field) is None]
    if unset:
        warnings.warn(f"init_adapter {where}: {', '.join(unset)} not used: the adapter leaves it unset and is "
                      f"continued as its {CONFIG_NAME} says")
    changed = [f"{key}={getattr(cfg, key)!r} but the adapter has {field}={getattr(saved, field)!r}"
               for field, key in block.items() if getattr(saved, field) is not None
               and unordered(getattr(method, field)) != unordered(getattr(saved, field))]
    if changed:
        raise ValueError(f"init_adapter {where}: {'; '.join(changed)}; a continued "
                         "adapter keeps the settings it was trained with: use the adapter's values")
    # its saved weights replace any init (LoRA's "eva" can only be loaded, not drawn)
    return replace(saved, init_lora_weights=True) if isinstance(saved, LoraConfig) else saved


def check_context(max_length: int, model_dir: Path, virtual_tokens: int = 0) -> None:
    """max_length tokens, after virtual_tokens positions (prefix and prompt tuning put their
    num_virtual_tokens before the real tokens, whose positions start there: prompt_learning), fit
    the model's context (max_position_embeddings in its config.json; no weight is read): the base
    never saw later positions, so examples reaching past it would train and be served outside what
    the model learned, without an error."""
    context = read_config(model_dir).max_position_embeddings
    if max_length + virtual_tokens > context:
        what = f"max_length={max_length}" + (f" + num_virtual_tokens={virtual_tokens}" if virtual_tokens else "")
        raise ValueError(f"{what} exceeds the model's context: {model_dir / 'config.json'} has "
                         f"max_position_embeddings={context}; use max_length <= {context - virtual_tokens}")


def check_outside_model(output_dir: str, model_dir: Path, name: str) -> None:
    """output_dir (the setting or flag `name`) is neither the base model's folder nor inside it: a
    job there would mix its files (adapter/, checkpoints) with the model's, and could alter the model."""
    if Path(output_dir).resolve().is_relative_to(model_dir.resolve()):
        raise ValueError(f"{name} {output_dir}: inside the base model's folder {model_dir}; the job's files would "
                         "mix with the model's, and could alter it: choose a folder outside it")


def warn_if_test_is_train(cfg: TrainConfig) -> None:
    """A test_file that is train_file scores the examples the model trains on: its eval loss then
    measures memorization, not generalization. A warning, not an error: a smoke test may mean it."""
    if cfg.test_file and Path(cfg.test_file).resolve() == Path(cfg.train_file).resolve():
        warnings.warn(f"test_file {cfg.test_file} is train_file {cfg.train_file}: the evaluation scores the "
                      "training examples (memorization, not generalization); give held-out data, or leave "
                      "test_file out to hold out test_ratio of train_file")


def check_job(cfg: TrainConfig) -> None:
    """What a job needs beyond TrainConfig's checks of each value, checked against the files
    before the model loads (seconds, not minutes, to an error): a train_file (TrainConfig leaves it
    optional because pretraining has none), a writable output_dir outside the base model's folder, a
    max_length (after prefix or prompt tuning's virtual tokens) within the model's context, and an
    init_adapter of the job's method, trained with its settings; a test_file that is train_file is
    warned of. Creates nothing. run_job then reads the data, still before the model."""
    if not cfg.train_file:
        raise ValueError("train_file is required: the JSONL file (instruction or conversation lines) to fine-tune on")
    check_output_dir(cfg.output_dir, "output_dir")
    check_outside_model(cfg.output_dir, default_model_dir(cfg.model), "output_dir")
    warn_if_test_is_train(cfg)
    method = method_config(cfg)
    check_context(cfg.max_length, default_model_dir(cfg.model), method.virtual_tokens if method is not None else 0)
    if cfg.init_adapter:
        check_continuation(cfg)


@dataclass
class JobResult:
    output_dir: Path
    result: TrainResult
    trainable: int
    total: int


def load_model(cfg: TrainConfig, device: Optional[torch.device] = None) -> Transformer:
    """The base model as the job trains it (bf16, NF4 for QLoRA), on device (default: cfg.device
    resolved)."""
    return load_pretrained(default_model_dir(cfg.model), dtype=torch.bfloat16 if cfg.bf16 else None,
                           device=device or dist.use_device(cfg.device),
                           quantization="nf4" if cfg.method == "qlora" else None)


def load_base(cfg: TrainConfig, device: Optional[torch.device] = None) -> tuple[Transformer, Tokenizer]:
    """load_model and the base's tokenizer (gradient checkpointing: the Trainer switches it on)."""
    return load_model(cfg, device), load_tokenizer(default_model_dir(cfg.model))


def load_data(cfg: TrainConfig, tok: Tokenizer, template: ChatTemplate) -> tuple[Rendered, Rendered]:
    """(train, test) rendered: train_file, and test_file or the test_ratio split held out of train_file."""
    specials = special_tokens(tok)  # content holding one would be encoded as that control token
    train = load_jsonl(cfg.train_file, specials)
    if cfg.test_file:
        test = load_jsonl(cfg.test_file, specials)
    else:
        train, test = split_examples(train, cfg.test_ratio, seed=cfg.seed)
    return (render_all(train, tok, template, cfg, cfg.train_file),
            render_all(test, tok, template, cfg, cfg.test_file or "test split"))


def run_job(cfg: TrainConfig, resume: bool = False) -> JobResult:
    """Run the whole job; everything it writes lands in cfg.output_dir."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if (out / "job_config.json").exists() and not resume:
        raise ValueError(f"{out} already holds a job: pass --resume to continue it, or choose another output_dir")
    check_job(cfg)
    template = get_template(cfg.template)  # an unknown name fails here, before the model loads
    tok = load_tokenizer(default_model_dir(cfg.model))
    # The data before the weights: a file that cannot train (malformed, too small to split, every
    # example too long) is an error in seconds, not after a model load of minutes.
    train, test = load_data(cfg, tok, template)
    device = dist.use_device(cfg.device)
    dist.init(device)  # under torchrun: join the other ranks (NCCL on GPUs)
    model = attach_method(load_model(cfg, device), cfg)
    if cfg.init_adapter:
        continue_from(model, cfg.init_adapter)
    trainer = Trainer(cfg, model, train, test, pad_id=tok.pad_id)
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

"""Pretraining a small base model from scratch: HTML pages -> text -> tokens -> windows -> Trainer.

1. Corpus: minipeft.corpus (HTML pages -> one text file of documents).
2. Split. Whole documents are held out (a seeded draw until `eval_fraction` of the characters),
   so held-out windows come from pages the model never trained on. The tokenizer trains on the
   training documents only. A seeded `copy_fraction` of the training passages also become copy
   exercises (minipeft.exercises: a passage, then some of its phrases quoted or listed), extra
   training documents that teach in-context copying; held-out documents get none.
3. Windows. Each document encodes as <s> ids </s>; the documents' ids are concatenated into one
   stream, cut into non-overlapping windows of `context_length` tokens (the tail shorter than a
   window is dropped). A window may span a document boundary, as in GPT-2's packing: </s> <s>
   tells the model that a new text begins. Labels equal input_ids; the Trainer shifts them, so
   a window of L tokens trains L - 1 next-token predictions.
4. Training. `minipeft.trainer.Trainer` with method "full" (every weight trains), AdamW, cosine
   schedule. The Trainer counts epochs over its example list; pretraining counts optimizer steps,
   so the list given to it holds exactly steps x batch_size windows: consecutive seeded
   permutations of all training windows (one permutation is one epoch), run as one "epoch".
   A `drill_fraction` of that list are instead repeat drills (exercises.repeat_drill: random
   ids, each piece written 2-3 times), each drawn fresh, shuffled in: the strongest push towards
   in-context copying (1.0: drills only, a first phase before text; see the model card).
   `--max-minutes` times a few steps first and picks the step count that fits. Windows are never
   padded, so the model's forward drops the all-ones mask and runs SDPA's causal kernel. `device`
   is the Trainer's; the model is initialized on the CPU (one seed, one start everywhere), then moved.

Tests: tests/test_pretrain.py (extraction, windows, split, a tiny run, the shipped model's parity
with transformers and its copying).
"""
from __future__ import annotations

import copy
import math
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch

from .argtypes import MAX_COUNT
from .checkpoint import WEIGHT_FILES, load_pretrained, read_config
from .config import ModelConfig
from .corpus import write_corpus
from .distributed import use_device
from .exercises import copy_exercises, induction_accuracy, repeat_drill
from .files import check_output_dir, json_bytes, read_json, replace_dir, staging_dir, write_atomic
from .model import Transformer
from .peft_model import full_finetune
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .train_config import TrainConfig
from .trainer import Trainer, read_metrics

PathLike = Union[str, os.PathLike]
# --- 2, 3. split and windows ------------------------------------------------------------------
def split_documents(docs: Sequence[str], eval_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out): documents drawn in a seeded order into held-out until they hold at least
    eval_fraction of all characters; both keep the corpus order. eval_fraction 0: no held-out."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    target, held, chars = eval_fraction * sum(map(len, docs)), set(), 0
    for i in order:
        if chars >= target:
            break
        held.add(i)
        chars += len(docs[i])
    if len(held) == len(docs):
        raise ValueError(f"eval_fraction={eval_fraction} holds out all {len(docs)} documents; "
                         "lower it or give more documents")
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def token_stream(docs: Sequence[str], tok: Tokenizer) -> list[int]:
    """<s> doc_0 </s> <s> doc_1 </s> ... as one list of ids."""
    return [i for doc in docs for i in tok.encode(doc, bos=True, eos=True)]


def make_windows(stream: Sequence[int], length: int) -> list[list[int]]:
    """Non-overlapping windows stream[k L : (k + 1) L]; the tail shorter than L is dropped."""
    if length < 2:
        raise ValueError(f"context_length must be >= 2 (one input and one target), got {length}")
    return [list(stream[i:i + length]) for i in range(0, len(stream) - length + 1, length)]


def schedule_windows(windows: Sequence[list[int]], n: int, seed: int = 0) -> list[list[int]]:
    """n windows: consecutive seeded permutations of `windows` (a permutation is one epoch)."""
    g, out = random.Random(seed), []
    while len(out) < n:
        epoch = list(windows)
        g.shuffle(epoch)
        out += epoch[:n - len(out)]
    return out


def spread(windows: Sequence[list[int]], k: int) -> list[list[int]]:
    """At most k windows evenly spaced over the list (a held-out sample that covers every document)."""
    if k <= 0 or len(windows) <= k:
        return list(windows)
    return [windows[i * len(windows) // k] for i in range(k)]


# --- 4. training ------------------------------------------------------------------------------
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings")


@dataclass
class PretrainConfig:
    # --- model (LLaMA architecture, tied embeddings) ---
    vocab_size: int = 4096  # SentencePiece BPE pieces, chat tokens and 256 bytes included
    hidden_size: int = 256
    intermediate_size: int = 0  # 0: 2.75 x hidden_size (LLaMA's 8/3 x, rounded to a multiple of 32)
    num_hidden_layers: int = 5
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # grouped-query attention: 2 query heads share one k/v head
    max_position_embeddings: int = 512  # what the model advertises; it trains on context_length
    # --- data ---
    context_length: int = 256  # tokens per training window
    eval_fraction: float = 0.02  # share of the corpus's characters held out (whole documents)
    eval_windows: int = 32  # held-out windows scored at each evaluation (evenly spread)
    copy_fraction: float = 0.0  # share of training passages that also become copy exercises (exercises.py)
    drill_fraction: float = 0.0  # share of training windows that are repeat drills (exercises.py)
    # --- optimization ---
    steps: int = 1000  # optimizer steps of batch_size windows
    batch_size: int = 4  # 1,024 tokens a step: early in training, more steps beat bigger batches
    learning_rate: float = 2e-3
    lr_scheduler_type: str = "cosine"  # constant_with_warmup keeps the rate up (drill phases: see the model card)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    adam_beta2: float = 0.999
    evaluations: int = 10  # held-out evaluations during training (plus one at the end)
    seed: int = 0
    device: str = "auto"  # TrainConfig.device: a GPU when torch sees one, else the CPU

    def __post_init__(self) -> None:
        """Check the settings before any work (the corpus and the tokenizer can take minutes).
        The fields are `minipeft pretrain`'s flags, so the errors name them as flags."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings", "eval_windows", "steps", "batch_size", "evaluations")
        checks = [(name, 1 <= getattr(self, name) <= MAX_COUNT, f">= 1 and <= {MAX_COUNT}") for name in positive] + [
            ("intermediate_size", 0 <= self.intermediate_size <= MAX_COUNT, f">= 0 (0: the default) and <= {MAX_COUNT}"),
            ("context_length", 2 <= self.context_length <= self.max_position_embeddings,
             f">= 2 and <= max_position_embeddings ({self.max_position_embeddings}): the model has no "
             "position past it"),
            # the fractions are used only after the corpus is read and the tokenizer trained
            ("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)"),
            *((name, 0 <= getattr(self, name) <= 1, "in [0, 1]") for name in ("copy_fraction", "drill_fraction")),
        ]
        bad = [f"--{name.replace('_', '-')} {getattr(self, name)} (expected {want})" for name, ok, want in checks
               if not ok]
        if bad:
            raise ValueError("invalid pretraining settings: " + "; ".join(bad))
        if not self.intermediate_size:
            self.intermediate_size = 32 * math.ceil(2.75 * self.hidden_size / 32)
        self.train_config(".")  # the optimization settings are TrainConfig's: it checks them
        try:  # and the architecture is ModelConfig's (heads that divide the width, an even head_dim, ...)
            self.model_config()
        except ValueError as e:
            raise ValueError(f"invalid pretraining settings: {e}") from None
        self._check_memory()

    def _check_memory(self) -> None:
        """Refuse a model and batch that cannot fit this machine's memory, before the corpus is read:
        a lower bound of 16 bytes a parameter (float32 weights, gradients and AdamW's two moments) plus
        a batch's float32 logits and their gradient, 8 · batch_size · context_length · vocab_size bytes."""
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not offered by this OS: the allocation will say
            return
        with torch.device("meta"):  # shapes only: no memory is allocated
            params = sum(p.numel() for p in Transformer(self.model_config()).parameters())
        needed = 16 * params + 8 * self.batch_size * self.context_length * self.vocab_size
        if needed > memory:
            raise ValueError(f"invalid pretraining settings: training needs at least {needed / 2**30:,.1f} GiB "
                             f"({params:,} parameters at 16 bytes each, and a batch's logits), more than this "
                             f"machine's {memory / 2**30:,.1f} GiB of memory: lower --hidden-size, --intermediate-size, "
                             "--num-hidden-layers, --vocab-size, --batch-size or --context-length")

    def model_config(self, tok: Optional[Tokenizer] = None) -> ModelConfig:
        """The model these settings build, with `tok`'s vocabulary and special ids (without one: vocab_size)."""
        ids = {} if tok is None else dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        return ModelConfig(vocab_size=self.vocab_size if tok is None else tok.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, tie_word_embeddings=True,
                           max_position_embeddings=self.max_position_embeddings, **ids)

    def train_config(self, output_dir: PathLike) -> TrainConfig:
        return TrainConfig(method="full", learning_rate=self.learning_rate, n_epochs=1, batch_size=self.batch_size,
                           warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay, adam_beta2=self.adam_beta2,
                           lr_scheduler_type=self.lr_scheduler_type, max_grad_norm=1.0, seed=self.seed,
                           device=self.device, max_length=self.context_length,  # the Trainer refuses longer examples
                           logging_steps=max(1, self.steps // 100), eval_steps=max(1, self.steps // self.evaluations),
                           # the result is saved once, in Hugging Face format: no resumable checkpoints
                           save_strategy="no", output_dir=str(output_dir))


def init_architecture(model_dir: PathLike) -> dict[str, Any]:
    """The ARCHITECTURE fields of the model in model_dir: a run that continues it (--init) keeps them,
    whatever the architecture flags say."""
    config = read_config(model_dir)
    return {k: getattr(config, k) for k in ARCHITECTURE}


def get_tokenizer(train_docs: Sequence[str], output: Path, vocab_size: int,
                  tokenizer_dir: Optional[PathLike] = None) -> Tokenizer:
    """The tokenizer in tokenizer_dir (copied into output), else one trained on train_docs."""
    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
        tok.save_pretrained(output)
        return tok
    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "train.txt"
        write_corpus(train_docs, text)
        return train_tokenizer([text], output, vocab_size)


def seconds_per_step(model: Transformer, cfg: PretrainConfig, windows: Sequence[list[int]], pad_id: int,
                     n: int = 3) -> float:
    """Mean wall time of n optimizer steps on a copy of `model`, after one warm-up step."""
    probe = copy.deepcopy(model)
    data = [(w, w) for w in schedule_windows(windows, (n + 1) * cfg.batch_size, cfg.seed)]
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(replace(cfg, steps=n + 1).train_config(d), probe, data, (), pad_id)
        batches = [list(range(k * cfg.batch_size, (k + 1) * cfg.batch_size)) for k in range(n + 1)]
        trainer.train_step(batches[0])
        t0 = time.perf_counter()
        for b in batches[1:]:
            trainer.train_step(b)
    return (time.perf_counter() - t0) / n


def steps_for_budget(cfg: PretrainConfig, step_seconds: float, minutes: float) -> int:
    """Steps that fit `minutes` with the evaluations; a forward pass over an eval batch is taken
    as 1/3 of a training step (forward + backward ~ 3 forwards)."""
    eval_seconds = (cfg.evaluations + 1) * math.ceil(cfg.eval_windows / cfg.batch_size) * step_seconds / 3
    steps = int((60 * minutes - eval_seconds) / step_seconds)
    if steps < 1:
        raise ValueError(f"--max-minutes {minutes}: one step takes {step_seconds:.1f}s; no step fits")
    return steps


def training_windows(windows: Sequence[list[int]], cfg: PretrainConfig, vocab_size: int,
                     bos_id: int) -> tuple[list[list[int]], int]:
    """(the steps x batch_size windows the run trains on, how many are drills): cfg.drill_fraction
    (in [0, 1]: PretrainConfig checks it) of them fresh repeat drills, the rest text windows scheduled epoch by epoch (schedule_windows);
    seeded shuffle.

    A drill opens with <s> only in a drills-only run (fraction 1), where <s> tells nothing and gives
    attention a fixed first token to rest on: this architecture formed induction heads from ~1,350
    steps with it, none in 1,800 without. Mixed with text, a drill must not look like a document: a
    model whose mixed drills opened with <s> read every prompt as a drill until something repeated."""
    n = cfg.steps * cfg.batch_size
    n_drills = round(cfg.drill_fraction * n)
    out = schedule_windows(windows, n - n_drills, cfg.seed)
    if n_drills:
        rng = random.Random(cfg.seed)
        start = [bos_id] if cfg.drill_fraction == 1 else []
        out += [start + repeat_drill(rng, vocab_size, cfg.context_length - len(start)) for _ in range(n_drills)]
        rng.shuffle(out)
    return out, n_drills


class Data(NamedTuple):
    tok: Tokenizer
    windows: list[list[int]]  # training windows
    held_out: list[list[int]]  # the evaluation sample of held-out windows
    train_documents: int
    eval_documents: int
    exercises: int  # copy exercises among the training documents


def prepare(docs: Sequence[str], output: Path, cfg: PretrainConfig,
            tokenizer_dir: Optional[PathLike] = None) -> Data:
    """Split, tokenize (training a tokenizer into output unless one is given) and window `docs`."""
    train_docs, eval_docs = split_documents(docs, cfg.eval_fraction, cfg.seed)
    tok = get_tokenizer(train_docs, output, cfg.vocab_size, tokenizer_dir)
    exercises = copy_exercises(train_docs, cfg.copy_fraction, cfg.seed, max_chars=3 * cfg.context_length // 2)
    windows = make_windows(token_stream([*train_docs, *exercises], tok), cfg.context_length)
    held_out = spread(make_windows(token_stream(eval_docs, tok), cfg.context_length), cfg.eval_windows)
    if eval_docs and not held_out:
        raise ValueError(f"the {len(eval_docs)} held-out documents make no window of {cfg.context_length} tokens: "
                         "raise --eval-fraction, shorten --context-length, or pass --eval-fraction 0")
    if len(windows) < cfg.batch_size:
        raise ValueError(f"the training documents make {len(windows)} windows of {cfg.context_length} tokens, "
                         f"fewer than one batch ({cfg.batch_size}): give more text or shorten --context-length")
    return Data(tok, windows, held_out, len(train_docs), len(eval_docs), len(exercises))


def pretrain(docs: Sequence[str], output: PathLike, cfg: PretrainConfig, epochs: Optional[float] = None,
             max_minutes: Optional[float] = None, tokenizer_dir: Optional[PathLike] = None,
             init: Optional[PathLike] = None, log=print) -> dict[str, Any]:
    """Train a tokenizer (unless given) and a LLaMA model from scratch on `docs`; write a Hugging
    Face directory (config.json, model.safetensors, tokenizer files, generation_config.json,
    metrics.jsonl, pretrain_results.json) to `output`; return the results dict. The directory is
    built beside `output` and swapped in whole when the run completes (files.replace_dir: other
    files there, such as a model card, stay): a run that stops early, hours in, leaves a model
    already at `output` as it was, not beside a new tokenizer. What it wrote (metrics.jsonl, the
    evidence of what went wrong) is kept in `<output>.failed/`.

    Training length: cfg.steps, or `epochs` passes over the text's training windows (drills come on
    top, drill_fraction of each batch), or as many steps
    as fit `max_minutes` (measured on a few steps first). `init`: continue pretraining the model
    in that directory (its weights, architecture and tokenizer) instead of starting from scratch.
    """
    if epochs is not None and max_minutes is not None:
        raise ValueError("give epochs or max_minutes, not both")
    if epochs is not None and cfg.drill_fraction == 1:
        raise ValueError("--epochs counts passes over the text, which --drill-fraction 1 does not train on: give --steps")
    t_start = time.perf_counter()
    device = use_device(cfg.device)  # before any output: a GPU the machine lacks is refused here
    output = check_output_dir(output, "output")
    stage = staging_dir(output)
    log(f"building the model in {stage} (metrics.jsonl, tensorboard/); it replaces {output} when the run completes")
    try:
        results = _pretrain(docs, stage, cfg, device, epochs, max_minutes, tokenizer_dir, init, log, t_start)
        replace_dir(stage, output, stale=WEIGHT_FILES)
    except BaseException:
        failed = output.resolve().with_name(output.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)  # an older failure's
        os.replace(stage, failed)
        log(f"the run stopped early: {output} is unchanged; what it wrote (metrics.jsonl) is in {failed}")
        raise
    return results


def _pretrain(docs: Sequence[str], output: Path, cfg: PretrainConfig, device: torch.device, epochs: Optional[float],
              max_minutes: Optional[float], tokenizer_dir: Optional[PathLike], init: Optional[PathLike],
              log, t_start: float) -> dict[str, Any]:
    """pretrain's run, written into the new directory `output`."""
    if init is not None:
        start = load_pretrained(init, device=device)
        cfg = replace(cfg, **init_architecture(init))
        tokenizer_dir = init
    data = prepare(docs, output, cfg, tokenizer_dir)
    log(f"corpus: {data.train_documents} training documents + {data.exercises} copy exercises -> "
        f"{len(data.windows)} windows of {cfg.context_length} tokens; {data.eval_documents} held-out documents -> {len(data.held_out)} eval windows")
    torch.manual_seed(cfg.seed)
    # initialized on the CPU, then moved: the same seed gives the same start on every device
    model = full_finetune(start if init is not None else Transformer(cfg.model_config(data.tok)).to(device))
    if epochs is not None:
        # drills take drill_fraction of every batch: the text's share is the rest
        text_per_step = cfg.batch_size * (1 - cfg.drill_fraction)
        cfg = replace(cfg, steps=max(1, math.ceil(epochs * len(data.windows) / text_per_step)))
    if max_minutes is not None:
        step_s = seconds_per_step(model, cfg, data.windows, data.tok.pad_id)
        cfg = replace(cfg, steps=steps_for_budget(cfg, step_s, max_minutes))
        log(f"{step_s:.2f}s per step: {cfg.steps} steps fit {max_minutes} minutes")
    windows, drills = training_windows(data.windows, cfg, data.tok.vocab_size, data.tok.bos_id)
    train = [(w, w) for w in windows]
    # the induction probe at every evaluation: metrics.jsonl shows when in-context copying appears
    result = Trainer(cfg.train_config(output), model, train, [(w, w) for w in data.held_out], data.tok.pad_id,
                     compute_metrics=lambda m: {"induction_accuracy": induction_accuracy(m)}).train()
    logged_losses = [r["loss"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r]  # the last window's
    model.eval().save_pretrained(output)
    write_atomic(output / "generation_config.json", json_bytes(
        {"bos_token_id": data.tok.bos_id, "eos_token_id": data.tok.eos_id, "pad_token_id": data.tok.pad_id}))
    results = {
        "parameters": sum(p.numel() for p in model.parameters()), "steps": result.steps,
        "tokens_seen": result.steps * cfg.batch_size * cfg.context_length,
        "epochs": (result.steps * cfg.batch_size - drills) / len(data.windows), "train_windows": len(data.windows),
        "train_tokens": len(data.windows) * cfg.context_length, "eval_windows": len(data.held_out),
        "train_documents": data.train_documents, "eval_documents": data.eval_documents,
        "copy_exercises": data.exercises, "repeat_drills": drills, "final_train_loss": logged_losses[-1], **result.eval,
        "train_seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second, "wall_seconds": time.perf_counter() - t_start,
        "config": asdict(cfg), "machine": machine(device),
        "init": None if init is None else {"model": str(init), "results": read_results(init)},
    }
    write_atomic(output / "pretrain_results.json", json_bytes(results))
    return results


def read_results(model_dir: PathLike) -> Optional[dict[str, Any]]:
    """The pretrain_results.json of a model directory, or None if it has none (a model not made here)."""
    path = Path(model_dir) / "pretrain_results.json"
    return read_json(path, "the results of the model continued") if path.is_file() else None


def phases(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs that made a model, first to last: a run that continued a model (`--init`) records
    that model's results under results["init"]["results"], which may record their own."""
    chain = [results]
    while (chain[-1].get("init") or {}).get("results"):
        chain.append(chain[-1]["init"]["results"])
    return chain[::-1]


def machine(device: torch.device) -> dict[str, Any]:
    """What the timings were measured on: the host, and the GPU when the run trained on one."""
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"device": str(device), **gpu, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}

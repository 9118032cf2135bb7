"""The training loop: AdamW over the trainable parameters, gradient accumulation normalized by
supervised tokens, warm-up + schedule, clipping, evaluation, atomic resumable checkpoints, DDP.

One optimizer step consumes a global batch of batch_size x gradient_accumulation_steps x
world_size examples; its loss is their summed NLL over their supervised tokens' count, whatever the
split into micro-batches or processes (train_batches: the math). Checkpoints and their resume:
train_state; metrics.jsonl and TensorBoard: train_log; the loss curves' diagnostics: diagnostics.
Logits are computed only at the supervised positions (metrics.head_loss), and the last layer
only from the first of them on (metrics.scored_suffix): the prompt's positions skip the vocabulary
projection and most of a layer. With torchrun, the Trainer joins the process group (built from
Python too) and, as torch's DistributedDataParallel, starts every rank from rank 0's trainable
weights; every rank takes its slice of each micro-batch; gradients are summed across ranks (gloo
on CPU, NCCL on GPU) and only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from .batching import PackedRow, collate, collate_packed
from .diagnostics import overfitting, unstable_loss
from .metrics import StreamingLMMetrics, head_loss, scored_suffix
from .model import Transformer
from .schedule import lr_factor
from .files import check_output_dir
from .train_batches import (Rendered, checked_examples, epoch_order, fingerprint, micro_batches,
                            pack_shuffled, supervised_tokens)
from .train_config import TrainConfig
from .train_log import MetricsLog, read_metrics, tensorboard_dir
from .train_state import latest_checkpoint, load_checkpoint, resumable_state, rng_states, save_checkpoint

# Imported from here by job.py, pretrain.py, the platform, tests and notebooks.
__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "param_groups", "Rendered", "supervised_tokens",
           "pack_shuffled", "MetricsLog", "read_metrics", "tensorboard_dir"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite: the run stops before the step is
    applied, its gradients dropped; the last good checkpoint is kept, and train(resume=True), on
    the same Trainer too, continues from it."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: decaying norm gains and biases pulls them towards 0, which nothing
    in their role asks for (the convention of GPT-2, nanoGPT and transformers' Trainer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False): attach a method "
                         "(get_peft_model(model, config)) or unfreeze it for full fine-tuning (full_finetune(model))")
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def check_weights(model: nn.Module) -> None:
    """Refuse a model the trainer cannot train, naming the first tensor concerned: one on the meta
    device (shapes without data: it fails in the first forward, deep in torch), and, in a full
    fine-tune, a 16-bit trainable parameter: AdamW would update it in its own dtype with no float32
    master copy, where an update below half its spacing (2^-8 of the weight in bf16) rounds away
    (TrainConfig refuses bf16 with method='full' for the same reason). A PeftModel's adapters are
    float32; its other trainable tensors (bias="all", modules_to_save) keep the base's dtype and
    train in it, as in PEFT."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device (a shape without data): load the weights first "
                             "(minipeft.load_pretrained, or model.to_empty(device=...) and load_state_dict)")
    if hasattr(model, "peft_config"):
        return
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            raise ValueError(f"{name} is a trainable {p.dtype} parameter: 16-bit weights keep no float32 master copy, "
                             "so small updates round away; train them in float32 (model.float()), or a PEFT method "
                             "(lora, qlora, ...) over the 16-bit base")


@dataclass
class TrainResult:
    steps: int
    train_loss: float  # the mean of every step's loss over the run, resumed parts too (HF's training_loss)
    eval: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tokens_per_second: float = 0.0
    seconds: float = 0.0


class Trainer:
    """Fine-tunes `model` (a PeftModel, or a Transformer for full fine-tuning) on rendered examples,
    where the model is (run_job loads it on config.device; under torchrun, one GPU per process)."""

    def __init__(self, config: TrainConfig, model: nn.Module, train_data: Sequence[Rendered],
                 eval_data: Sequence[Rendered] = (), pad_id: int = 0,
                 compute_metrics: Optional[Callable[[nn.Module], dict[str, float]]] = None):
        """compute_metrics(model): extra numbers for every evaluation (model in eval mode, no grad),
        logged beside eval_loss in metrics.jsonl and TensorBoard. Under torchrun it runs on rank 0
        only, which logs: every rank holds the same model, so the others would repeat its work."""
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig (TrainConfig(**settings) or TrainConfig.from_dict), "
                            f"got {type(config).__name__}")
        dataclasses.replace(config)  # checks its values again: one set after construction (batch_size = 0) too
        self.cfg, self.model, self.pad_id, self.compute_metrics = config, model, pad_id, compute_metrics
        check_weights(model)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        if frozen and (torch.bfloat16 in frozen) != config.bf16:  # bf16 is applied where the base is loaded
            warnings.warn(f"bf16={config.bf16}, but the model's frozen weights are {', '.join(sorted(map(str, frozen)))}: "
                          "bf16 says how `minipeft train` (run_job) loads the base; a Trainer trains the model as it "
                          f"is given, and its checkpoints record bf16={config.bf16}", stacklevel=2)
        vocab = model.config.vocab_size
        if not 0 <= pad_id < vocab:
            raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary [0, {vocab}): use the tokenizer's pad_id")
        train = checked_examples(train_data, "train_data", vocab, config.max_length)
        self.eval_data = checked_examples(eval_data, "eval_data", vocab, config.max_length)
        for name, data in (("train_data", train), ("eval_data", self.eval_data)):
            if data and not supervised_tokens(data):  # training would step on zero gradients; evaluation divide by 0
                raise ValueError(f"{name}: no supervised token in its {len(data)} examples: every label is -100 "
                                 "(the first is never predicted); render them with a label_mode that supervises a turn")
        if not train:
            raise ValueError("train_data is empty: no training examples")
        self.data = fingerprint(train)  # recorded in checkpoints: a resume on other data is refused
        self.train_data: list[Rendered | PackedRow] = (
            pack_shuffled(train, config.max_length, config.seed) if config.packing else train)
        self.out = check_output_dir(config.output_dir, "output_dir")
        self.device = dist.join(model)  # under torchrun: run_job has joined the ranks; from Python, join them here
        self.rank, self.world = dist.rank(), dist.world_size()
        if config.gradient_checkpointing:  # as HF's Trainer, in the model it is given (a PeftModel's base too)
            for module in model.modules():
                if isinstance(module, Transformer):
                    module.gradient_checkpointing = True
        self.global_batch = config.batch_size * config.gradient_accumulation_steps * self.world
        self.steps_per_epoch = math.ceil(len(self.train_data) / self.global_batch)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.n_epochs
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.warmup = math.ceil(config.warmup_ratio * self.total_steps)
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2), eps=1e-8)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # As DistributedDataParallel: ranks whose adapters were drawn from other seeds would each
        # apply the summed gradients to other weights. (The frozen base is read from the same files.)
        dist.broadcast(self.params)
        self.step = 0
        self.warnings: dict[str, str] = {}  # diagnostic -> its warning: each warns once a run (_warn)
        # The progress the logs and diagnostics look back on, saved in checkpoints: the losses of
        # the last steps, the step last logged, (train, eval) loss pairs for the over-fitting check.
        self.losses: list[float] = []
        self.loss_sum = 0.0  # of every step's loss: TrainResult.train_loss is its mean
        self.logged = 0
        self.evals: list[tuple[float, float]] = []

    # --- one optimizer step -------------------------------------------------------------------
    def _forward(self, examples: Sequence[Rendered | PackedRow],
                 return_hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, n, V), or with return_hidden the final hidden states (B, n, d); labels (B, n)):
        with return_hidden only the last n = scored_suffix(labels) positions, else all T. Packed
        rows carry their positions and block-diagonal causal mask (batching.collate_packed)."""
        packed = isinstance(examples[0], PackedRow)
        batch = collate_packed(examples, self.pad_id, self.model.config.sliding_window) if packed else \
            collate(examples, self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        n = scored_suffix(batch["labels"]) if return_hidden else 0
        out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch.get("position_ids"), return_hidden=return_hidden, logits_to_keep=n)
        return out, batch["labels"][:, -n:]

    def _nll(self, examples: Sequence[Rendered | PackedRow]) -> torch.Tensor:
        """Summed NLL of the supervised tokens; the last layer and lm_head only where it is scored."""
        hidden, labels = self._forward(examples, return_hidden=True)
        return head_loss(hidden, labels, self.model.get_output_embeddings(), reduction="sum")

    def train_step(self, batch: list[int]) -> tuple[float, float, int]:
        """One optimizer step on the global batch `batch` -> (loss, grad norm, supervised tokens)."""
        n_tokens = supervised_tokens([self.train_data[i] for i in batch])
        lr = self.cfg.learning_rate * lr_factor(self.cfg.lr_scheduler_type, self.step, self.total_steps, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        nll_sum = torch.zeros((), device=self.device)
        for micro in micro_batches(batch, self.cfg.batch_size, self.rank, self.world):
            if micro:
                nll = self._nll([self.train_data[i] for i in micro])
                (nll / max(n_tokens, 1)).backward()
                nll_sum += nll.detach()
        dist.sum_gradients(self.params, nll_sum)
        loss = nll_sum.item() / max(n_tokens, 1)
        if not math.isfinite(loss):
            raise self._diverged("loss", loss)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):  # clipping cannot rescue it: the step would write NaN weights
            raise self._diverged("gradient norm", grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, grad_norm, n_tokens

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        """The error for a non-finite `what`, once the step's gradients are dropped: left in .grad,
        a resume on this Trainer would add every later step's gradients to them."""
        self.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(self.out)
        return TrainingDiverged(f"{what} became {value} at step {self.step + 1}: training stopped. The learning "
                                f"rate ({self.cfg.learning_rate}) may be too large. Last good checkpoint: "
                                f"{last or 'none'}")

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity, token accuracy on the eval split (token-weighted over all of it). Under
        torchrun each rank scores its share of the batches and the sums are added up."""
        if not self.eval_data:  # as transformers' Trainer
            raise ValueError("evaluation requires eval_data: this Trainer was given no evaluation examples")
        was_training = self.model.training
        self.model.eval()
        acc, size = StreamingLMMetrics(), self.cfg.eval_batch_size or self.cfg.batch_size
        for i in range(self.rank * size, len(self.eval_data), self.world * size):
            acc.update(*self._forward(self.eval_data[i:i + size], return_hidden=False))
        sums = torch.tensor([acc.nll_sum, acc.num_tokens, acc.num_correct], dtype=torch.float64, device=self.device)
        dist.all_reduce_sum([sums])
        acc.nll_sum, acc.num_tokens, acc.num_correct = sums[0].item(), int(sums[1]), int(sums[2])
        extra = self._extra_metrics() if self.compute_metrics and self.rank == 0 else {}
        self.model.train(was_training)
        m = acc.compute()
        return {"eval_loss": m["loss"], "eval_perplexity": m["perplexity"], "eval_token_accuracy": m["token_accuracy"],
                **extra}

    def _extra_metrics(self) -> dict[str, float]:
        """compute_metrics(model), its 0-d tensors and numpy numbers as Python numbers (as transformers'
        Trainer takes them); anything but a dict of new names to numbers is an error naming it, not a
        JSON error or an eval_loss silently replaced."""
        extra = self.compute_metrics(self.model)
        if not isinstance(extra, dict):
            raise TypeError(f"compute_metrics returned {type(extra).__name__}: expected a dict of names to numbers")
        out = {}
        for key, value in extra.items():
            value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value
            if not isinstance(key, str) or key in ("step", "epoch", "eval_loss", "eval_perplexity",
                                                   "eval_token_accuracy"):
                raise ValueError(f"compute_metrics returned the key {key!r}: expected a name of its own (not step, "
                                 "epoch, or a metric the Trainer computes)")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"compute_metrics returned {key!r}: {value!r}: expected a number")
            out[key] = value
        return out

    # --- the loop -----------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        """Train for the configured steps; resume: continue from output_dir's newest checkpoint (none
        there is an error, as in transformers' Trainer, unless this Trainer has trained: a diverged run)."""
        if resume:
            if self.step == 0 and latest_checkpoint(self.out) is None:  # as transformers' Trainer
                raise ValueError(f"no checkpoint to resume from in output_dir {self.out}: train() starts a new run")
            self.resume()
        elif self.step == 0 and (earlier := latest_checkpoint(self.out)) is not None:  # not resume()d already
            # A fresh run among another run's checkpoints: rotation (by step) would delete its own
            # newer-run checkpoints first, and a later resume would continue the other run.
            raise ValueError(f"{self.out} holds checkpoints of an earlier run ({earlier.name}): train(resume=True) "
                             "continues it; or train into another output_dir")
        self.model.train()
        metrics = MetricsLog(self.out / "metrics.jsonl", self.step, enabled=self.rank == 0,
                             tensorboard=tensorboard_dir(self.cfg))
        if self.step >= self.total_steps:
            return self._completed(metrics)
        t0, tokens = time.perf_counter(), 0
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or self.cfg.disable_tqdm,
                   desc="train", unit="step")
        try:
            for epoch in range(self.step // self.steps_per_epoch, self.epochs):
                order = epoch_order(len(self.train_data), self.cfg.seed, epoch)
                last = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
                for s in range(self.step - epoch * self.steps_per_epoch, last):
                    batch = order[s * self.global_batch:(s + 1) * self.global_batch]
                    loss, grad_norm, _ = self.train_step(batch)
                    tokens += sum(len(self.train_data[i][0]) for i in batch)  # every token the model reads
                    self.losses.append(loss)
                    self.loss_sum += loss
                    rate = tokens / (time.perf_counter() - t0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                    tok_s=f"{rate:.0f}")
                    if self.step % self.cfg.logging_steps == 0 or self.step == self.total_steps:
                        # the mean since the last log, as HF
                        window, self.logged = self.losses[-(self.step - self.logged):], self.step
                        metrics.write({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                       "loss": sum(window) / len(window),
                                       "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                                       "tokens_per_s": rate})
                        if epoch == 0:
                            self._warn(unstable_loss, [r["loss"] for r in metrics.rows if "loss" in r])
                    end_of_epoch, last_step = s == last - 1, self.step == self.total_steps
                    # The final evaluation too, before the last checkpoint: its warnings are saved with it.
                    if self.eval_data and ((self.cfg.eval_steps and self.step % self.cfg.eval_steps == 0)
                                           or (end_of_epoch and not self.cfg.eval_steps) or last_step):
                        self._log_evaluation(metrics)
                    # steps: also at the last step (as HF), so a finished run resumes as complete, not retrained
                    if (self.cfg.save_strategy == "steps" and (self.step % self.cfg.save_steps == 0 or last_step)) or \
                            (self.cfg.save_strategy == "epoch" and end_of_epoch):
                        self._save()
            seconds = time.perf_counter() - t0
            final_eval = self._final_evaluation(metrics)
        finally:  # a diverged run (TrainingDiverged) or Ctrl-C too: the bar ends its line, TensorBoard flushes
            bar.close()
            metrics.close()
        return TrainResult(self.step, self.loss_sum / self.step, final_eval, list(self.warnings.values()),
                           tokens / max(seconds, 1e-9), seconds)

    def _log_evaluation(self, metrics: MetricsLog) -> dict[str, Any]:
        """Evaluate, log, and check for over-fitting against the last epoch's mean train loss
        (the final evaluation too: the last eval loss is the one most likely to have risen)."""
        result = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **self.evaluate()}
        metrics.write(result)
        recent = self.losses[-self.steps_per_epoch:]
        self.evals.append((sum(recent) / len(recent), result["eval_loss"]))
        self._warn(overfitting, self.evals)
        return result

    def _final_evaluation(self, metrics: MetricsLog) -> dict[str, float]:
        """The evaluation at the last step: the one the loop logged there, else (a finished run
        resumed from a checkpoint written before the loop evaluated at its last step) run now and
        logged, once."""
        if not self.eval_data:
            return {}
        done = [r for r in metrics.rows if r["step"] == self.step and "eval_loss" in r]
        result = done[-1] if done else self._log_evaluation(metrics)
        return {k: v for k, v in result.items() if k not in ("step", "epoch")}

    def _completed(self, metrics: MetricsLog) -> TrainResult:
        """Resumed from the last step's checkpoint: nothing to train; the run's saved result."""
        if self.rank == 0:
            print(f"{self.out}: the run is already complete ({self.step} of {self.total_steps} steps, "
                  f"{latest_checkpoint(self.out)}); nothing to train. Its result:")
        final_eval = self._final_evaluation(metrics)
        metrics.close()
        rates = [r["tokens_per_s"] for r in metrics.rows if "tokens_per_s" in r]
        return TrainResult(self.step, self.loss_sum / self.step, final_eval, list(self.warnings.values()),
                           rates[-1] if rates else 0.0)

    def _warn(self, check: Callable[..., Optional[str]], *args: Any) -> None:
        """Run diagnostic `check` on args, and warn with its message, unless it has warned already:
        its message quotes the latest numbers, so it would otherwise warn anew at every log."""
        if check.__name__ in self.warnings:
            return
        message = check(*args)
        if message:
            self.warnings[check.__name__] = message
            if self.rank == 0:
                warnings.warn(message, stacklevel=2)

    def _save(self) -> None:
        rng = rng_states()  # every rank's generators, gathered
        if self.rank == 0:
            # The losses the next log and evaluation average over, so a resumed run logs the same.
            recent = self.losses[-max(self.step - self.logged, self.steps_per_epoch):]
            state = {"step": self.step, "warnings": self.warnings, "losses": recent, "loss_sum": self.loss_sum,
                     "logged": self.logged, "evals": self.evals, "config": self.cfg.to_dict(),
                     "world_size": self.world, "data": self.data}
            save_checkpoint(self.out, self.step, self.model, self.optimizer, state, self.cfg.save_total_limit, rng)
        dist.barrier()

    def resume(self) -> None:
        """Continue from the newest checkpoint in output_dir, if any; its config must match this
        one but for the settings train_state.RESUMABLE names (an error lists each difference) and a
        longer run (train_state.LENGTH: its schedule), and it must have been written by as many
        processes (train_state.resumable_state checks)."""
        path = latest_checkpoint(self.out)
        if path is None:
            return
        state = resumable_state(path, self.cfg.to_dict(), self.world, self.steps_per_epoch, self.data)
        load_checkpoint(path, self.model, self.optimizer)
        self.step, self.logged = state["step"], state["logged"]
        warned = state["warnings"]  # a list of messages in checkpoints written before each check warned once
        self.warnings = warned if isinstance(warned, dict) else {message: message for message in warned}
        self.losses, self.loss_sum, self.evals = state["losses"], state["loss_sum"], [tuple(e) for e in state["evals"]]


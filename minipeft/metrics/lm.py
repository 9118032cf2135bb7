"""Causal language-modelling metrics: loss (mean NLL), perplexity and next-token accuracy.

Shift convention (as Hugging Face causal LMs): logits (B, T, V) at position t predict
labels[:, t + 1], so logits[:, :-1] are scored against labels[:, 1:]. Labels equal to
IGNORE_INDEX (-100: padding, prompt tokens) are excluded. Over the N kept tokens:

    NLL        = -sum_t log softmax(logits_t)[y_{t+1}]      (summed in float32, even for bf16 logits)
    loss       = NLL / N
    perplexity = exp(loss)
    accuracy   = #{argmax_v logits_t = y_{t+1}} / N

tests/test_metrics.py checks these against torch.nn.functional.cross_entropy on the shifted,
flattened tensors, written out independently.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..fused import cross_entropy_sum

IGNORE_INDEX = -100


def _targets(labels: torch.Tensor, scores: torch.Tensor, what: str) -> torch.Tensor:
    """Validate labels (B, T) against `scores` (B, T, V or d), return the shifted targets (B, T-1)."""
    if scores.dim() != 3 or labels.dim() != 2 or scores.shape[:2] != labels.shape:
        raise ValueError(f"expected {what} and labels (B, T); got {what.split()[0]} {tuple(scores.shape)} "
                         f"and labels {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    return labels[:, 1:].long()


def _check_range(kept: torch.Tensor, vocab: int) -> torch.Tensor:
    """The scored targets, after checking that each is a token id below vocab."""
    if kept.numel() and (kept.min() < 0 or kept.max() >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX} (ignored); "
                         f"got values in [{int(kept.min())}, {int(kept.max())}]")
    return kept


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, then return (logits (B*(T-1), V), targets (B*(T-1),)) with the HF one-step shift."""
    vocab = logits.shape[-1]
    targets = _targets(labels, logits, "logits (B, T, V)").reshape(-1)
    _check_range(targets[targets != IGNORE_INDEX], vocab)
    return logits[:, :-1].reshape(-1, vocab), targets


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Shifted next-token cross-entropy, float32, differentiable.

    reduction="mean": NLL / N (the training loss). A batch whose labels are all IGNORE_INDEX
    returns 0 (and zero gradients) instead of cross_entropy's NaN, so one fully-masked batch
    cannot poison a training run. reduction="sum": NLL, for callers that normalise themselves
    (e.g. by the token count of a whole gradient-accumulation step).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"causal_lm_loss: reduction={reduction!r}, expected 'mean' or 'sum'")
    flat_logits, targets = _shifted(logits, labels)
    nll = F.cross_entropy(flat_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return nll
    return nll / (targets != IGNORE_INDEX).sum().clamp_min(1)


def head_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
              reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """causal_lm_loss(lm_head(hidden), labels), computing logits only where they are scored.

    hidden (B, T, d): the model's final normed hidden states. Of the B(T-1) positions, only the
    N whose next token is supervised go through lm_head: (N, d) -> (N, V). In fine-tuning the
    prompt and the padding are not supervised, so the vocabulary projection (d x V per token: a
    fifth of a small model's multiplies) and the log-softmax over V skip them; nor are the
    (B, T, V) float32 logits and their gradient ever held. Same value and gradients (test_metrics).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"head_loss: reduction={reduction!r}, expected 'mean' or 'sum'")
    targets = _targets(labels, hidden, "hidden (B, T, d)")
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep])  # (N, V)
    nll = cross_entropy_sum(logits, _check_range(targets[keep], logits.shape[-1]))  # hand-derived backward: minipeft.fused
    return nll if reduction == "sum" else nll / keep.sum().clamp_min(1)


def scored_suffix(labels: torch.Tensor) -> int:
    """n such that only the last n positions' hidden states feed a shifted loss over labels (B, T):
    n = T - t0, t0 the first position whose next token is scored in some row (n = 1 when none is).

    Pass it as the model's logits_to_keep, with labels[:, -n:] to head_loss: the same loss and
    gradients, while the last layer skips the positions before the batch's earliest scored one.
    """
    scored = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(scored[0]) if len(scored) else 1


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # loss > ~709 nats/token: perplexity is beyond float64
        return math.inf


class StreamingLMMetrics:
    """Accumulates NLL, token and correct-prediction counts over batches (sufficient statistics).

    Dataset perplexity is exp(total NLL / total tokens), i.e. the exponentiated per-token mean.
    The mean of per-batch perplexities is a different, biased number: batches hold different
    numbers of kept tokens (padding, masked prompts), so averaging per-batch values overweights
    short batches; and exp is convex, so mean_b exp(loss_b) >= exp(mean_b loss_b) (Jensen), which
    inflates perplexity whenever batches differ. Sums are kept as Python floats (float64) so that
    rounding does not drift over many batches.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.nll_sum, self.num_tokens, self.num_correct = 0.0, 0, 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: logits (B, T, V) and labels (B, T), shifted as in causal_lm_loss."""
        flat_logits, targets = _shifted(logits, labels)
        nll = F.cross_entropy(flat_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        self.nll_sum += nll.item()
        self.num_tokens += int((targets != IGNORE_INDEX).sum())
        self.num_correct += int((flat_logits.argmax(-1) == targets).sum())  # an argmax is never -100

    def compute(self) -> dict[str, float]:
        """{"loss", "perplexity", "token_accuracy", "num_tokens"} over everything added so far."""
        if self.num_tokens == 0:
            raise ValueError("StreamingLMMetrics.compute: no labelled tokens were accumulated "
                             f"(all labels were {IGNORE_INDEX}, or update() was never called)")
        loss = self.nll_sum / self.num_tokens
        return {"loss": loss, "perplexity": _safe_exp(loss),
                "token_accuracy": self.num_correct / self.num_tokens, "num_tokens": self.num_tokens}


def _one_batch(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = StreamingLMMetrics()
    metrics.update(logits, labels)
    return metrics.compute()


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """exp(mean shifted NLL) of one batch; for a dataset, use StreamingLMMetrics."""
    return _one_batch(logits, labels)["perplexity"]


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of kept positions where argmax(logits[:, t]) == labels[:, t + 1]."""
    return _one_batch(logits, labels)["token_accuracy"]

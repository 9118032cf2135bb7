"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling, and
OpenAI's presence and frequency penalties.

Each step feeds only the newest token and reuses the cached keys/values of the past, so a step
costs O(S) attention instead of re-running the whole prefix. Batches are left-padded: every row
ends at the same column, so the next token of each row is read from the last position.
Greedy output equals `transformers`' greedy generate token for token (tests/test_generation.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .model import KVCache


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """logits (B, V) with the tokens top-k and then top-p sampling exclude set to -inf, as transformers'
    TopKLogitsWarper and TopPLogitsWarper do.

    top_k keeps the k largest logits (None or 0: disabled, HF's convention); top_p keeps the smallest
    set of most likely tokens whose probability reaches p (nucleus sampling, Holtzman et al. 2019),
    always at least the most likely one, so top_p=0 is greedy (None or 1: disabled).
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be a positive integer, or 0 or None to disable it, got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0) -> torch.Tensor:
    """logits (B, V) less OpenAI's presence and frequency penalties, as its API reference defines them:

        logits[b, j] -= counts[b, j] * frequency_penalty + (counts[b, j] > 0) * presence_penalty

    counts (B, V): how often row b generated token j so far (the reply only, not the prompt). A
    positive penalty discourages repeating a token (frequency: more so the more often it came),
    a negative one encourages it. Applied before temperature and top-p, so it moves greedy's argmax too.
    """
    penalty = counts * frequency_penalty + (counts > 0) * presence_penalty
    return logits - penalty.to(logits.dtype)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax); else a draw from
    softmax(filter_logits(logits / temperature, top_k, top_p)). The largest logit is subtracted
    first (softmax does not change), in float64 (where 5e-324 is not 0): a tiny temperature (1e-40)
    then sends the others to -inf, a draw of the argmax, rather than every logit to +-inf and the
    probabilities to NaN."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    logits = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    pad_token_id: Optional[int] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """input_ids (B, T), left-padded when rows differ (a right-padded row is refused) -> (B, T + n)
    with n <= max_new_tokens.

    A row that emitted an eos token is finished: it is filled with pad_token_id (default: the
    model.config's, else the first eos id) and generation stops when every row is finished.
    eos_token_id defaults to model.config's, as in transformers; eos_token_id=[] never stops early. `model` is any callable with
    the Transformer's signature, model(ids, attention_mask=, cache=, logits_to_keep=) -> logits
    (B, T', V) (a PeftModel works: prefix tuning fills the cache first). use_cache=True also needs
    model.config.num_hidden_layers (the cache holds one key/value pair per layer), else it is refused
    up front: a callable without it (a plain function) takes use_cache=False, each step re-running the prefix.
    presence_penalty and frequency_penalty: see `apply_penalties`; each row counts its own tokens.
    """
    if not temperature >= 0:  # not `< 0`: NaN passes that, and fails later inside torch.multinomial
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if use_cache and layers is None:  # else an AttributeError on None, naming nothing
        name = getattr(model, "__qualname__", None) or type(model).__qualname__  # a function's name, or a class's
        raise ValueError(f"use_cache=True needs model.config.num_hidden_layers (the KV cache holds one key/value "
                         f"pair per layer), which {name} lacks; pass use_cache=False, or give the model a config")
    config = getattr(model, "config", None)  # as transformers' generate: the model's ids unless given
    eos_token_id = getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
    pad_token_id = getattr(config, "pad_token_id", None) if pad_token_id is None else pad_token_id
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    B, T = input_ids.shape
    if attention_mask is not None:  # a row of padding only is an empty prompt, as in transformers
        right_padded = ((attention_mask[:, -1] == 0) & attention_mask.bool().any(-1)).nonzero().flatten().tolist()
        if right_padded:  # its next token would be read after its padding: garbage, without an error
            raise ValueError(f"attention_mask: row {right_padded[0]} ends with padding; generation continues "
                             "every row from the last column, so pad on the left "
                             "(Tokenizer.batch_encode(padding_side='left'))")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache = KVCache(layers) if use_cache else None
    ids, step_ids = input_ids, input_ids
    for _ in range(max_new_tokens):
        # logits_to_keep=1: the prompt's last layer and lm_head only where the next token is read
        logits = model(step_ids if use_cache else ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1, :]
        if presence_penalty or frequency_penalty:  # counted afresh from the reply: cheap next to the forward
            new = ids[:, T:]
            counts = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, new, torch.ones_like(new))
            logits = apply_penalties(logits, counts, presence_penalty, frequency_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        ids = torch.cat((ids, nxt[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(nxt[:, None])), dim=1)
        step_ids = nxt[:, None]
        finished |= torch.isin(nxt, eos_t)
        if eos and bool(finished.all()):
            break
    return ids

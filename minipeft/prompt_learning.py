"""Prompt learning: P trainable virtual tokens in front of every sequence, the model frozen.

Prefix tuning (Li & Liang 2021, arXiv:2101.00190) learns, for every layer, P keys and P values
that every position attends to; they enter through the KV cache, before the real tokens:

    table (P, L·2·w), w = n_kv·hd    (reparameterized: table = Linear(Tanh(Linear(E))), E (P, w))
    view (P, L·2, n_kv, hd) -> permute (L·2, n_kv, P, hd): layer i keys = [2i], values = [2i+1]
    attention of layer i over [prefix_i ; x]:  softmax(q [K_i ; K_x]ᵀ/√hd) [V_i ; V_x]

Prompt tuning (Lester et al. 2021, arXiv:2104.08691) learns P input embeddings (P, d) that are
concatenated before the token embeddings: the model reads [prompt ; embed(ids)] (B, P+T, d).

Both extend the attention mask with P ones in front (virtual tokens are never padding), so a
real token's position is P + (number of real tokens before it), and shift explicit position_ids
by P (prompt tuning numbers its virtual tokens 0..P-1 in front of them). PEFT 0.22 shifts them
only for prefix tuning; for prompt tuning it warns, drops them, and the model numbers all P + T
inputs 0.. pads included (its generate too). So on left-padded batches prompt-tuning logits differ from PEFT's by
design: minipeft numbers real tokens only, PEFT numbers pads too (tests/test_prefix_prompt.py
`our_logits` passes PEFT's numbering, arange(T), explicitly to compare). With a KV cache, the virtual tokens are put into an empty cache once; later
generation steps find them there and add nothing. Under a sliding window (Mistral) the virtual
tokens are the oldest keys and leave the window like any other, as in transformers.

Trainable parameters: prefix P·L·2·w (+ P·w + w·h + h + h·L·2·w + L·2·w with the MLP of hidden
width h), prompt P·d. LLaMA-2-7B, P = 20: 5,242,880 (0.0777%) and 81,920 (0.0012%).

Neither starts as an exact no-op. A prefix key k takes softmax weight exp(q·k/√hd)/Z > 0 for any
finite k, so the real tokens' weights shrink by that mass and the prefix values mix in; even all-
zero keys and values (init_weights="zero") take weight 1/Z each and scale the output down. Only
keys at -inf would vanish, and those have no gradient. The same holds for a soft prompt.

Files and shapes follow Hugging Face PEFT (PrefixEncoder, PromptEmbedding): peft_type
"PREFIX_TUNING" / "PROMPT_TUNING", one tensor `prompt_embeddings` holding the table (the MLP's
output when prefix_projection: the MLP is folded away). A folded file loads with its MLP gone;
training it further trains the table. For GQA models token_dim is the key/value width n_kv·hd
and num_attention_heads is n_kv (prefix tuning; PEFT issue #1901). PEFT's forward returns logits
for the virtual positions too when prompt tuning (B, P+T, V); here the logits are the real
tokens' only (B, T, V), aligned with input_ids, so PEFT's prompt-tuning loss also scores labels[:, 0]
(read at the last virtual token) and a loss over these logits does not. tests/test_prefix_prompt.py
checks logits, files both ways, generation and parameter counts against peft;
tests/test_prompt_learning_fuzz.py, 25 drawn cases (also losses, gradients, peft's generate).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import torch
from torch import nn

from .model import KVCache, Transformer, check_position_ids
from .peft_config import PeftConfig
from .tokenizer import load_tokenizer

PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning method shares (PEFT's PromptLearningConfig); the model fills the Nones."""

    num_virtual_tokens: Optional[int] = None  # P
    token_dim: Optional[int] = None  # width of one virtual token (per layer and k/v for prefix tuning)
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None  # PEFT's field; not supported with prompt learning here
    is_prompt_learning = True
    # inference_mode (PeftConfig) is also set by PeftModel.from_pretrained when loading for inference, as in
    # PEFT: the saved table replaces any init, so TEXT init skips its tokenizer (which may be a hub name).
    # PEFT's other field here: an encoder-decoder's two tables (2); 1 or None on a decoder-only model
    peft_fields = {**PeftConfig.peft_fields, "num_transformer_submodules": (1, None)}

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        self._check_positive_int("num_virtual_tokens")
        # PEFT's PeftModel(task_type=None) adds no virtual tokens (its forward fails), and SEQ_2_SEQ_LM
        # doubles the table for an encoder-decoder; every other task type runs the causal LM as CAUSAL_LM.
        if self.task_type in (None, "SEQ_2_SEQ_LM"):
            raise ValueError(f"{name}: task_type={self.task_type!r} is not supported with prompt learning on a "
                             "decoder-only model; use 'CAUSAL_LM'")
        if self.modules_to_save:
            raise ValueError(f"{name}: modules_to_save={self.modules_to_save!r} is not supported with prompt learning")

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    def fill(self, **needed: int) -> None:
        """Set the model-derived fields that are None; refuse values that contradict the model."""
        for field, value in needed.items():
            current = getattr(self, field)
            if current is None:
                setattr(self, field, value)
            elif current != value:
                raise ValueError(f"{type(self).__name__}: {field}={current} does not match the model, "
                                 f"which needs {field}={value}")


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    prefix_projection: bool = False  # learn the table through Linear-Tanh-Linear on an embedding
    encoder_hidden_size: Optional[int] = None  # the MLP's hidden width; None: token_dim
    init_weights: Optional[str] = None  # None: N(0, 1) table (nn.Embedding's init); "zero": zeros
    peft_type = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig: init_weights must be None or 'zero', got {self.init_weights!r}")


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: str = "RANDOM"  # "RANDOM": N(0, 1); "SAMPLE_VOCAB": random tokens' embeddings; "TEXT"
    prompt_tuning_init_text: Optional[str] = None  # "TEXT": these tokens' embeddings, repeated to P
    tokenizer_name_or_path: Optional[str] = None  # "TEXT": a SentencePiece tokenizer directory
    tokenizer_kwargs: Optional[dict] = None  # PEFT's field; must stay None
    peft_type = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"PromptTuningConfig: prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text "
                             "and tokenizer_name_or_path")
        if self.tokenizer_kwargs:
            raise ValueError(f"PromptTuningConfig: tokenizer_kwargs={self.tokenizer_kwargs!r} is not supported")


def _device(model: Transformer) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers())).device


def _with_virtual_tokens(P: int, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]):
    """Mask (B, S) -> (B, P+S) with P ones in front; explicit positions shifted by P."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"prompt learning needs a 2-D (batch, seq) attention_mask, got shape "
                         f"{tuple(attention_mask.shape)}; packed rows (4-D masks) are not supported")
    if attention_mask is not None:
        ones = attention_mask.new_ones(attention_mask.shape[0], P)
        attention_mask = torch.cat((ones, attention_mask), dim=1)
    return attention_mask, None if position_ids is None else position_ids + P


class PrefixEncoder(nn.Module):
    """The prefix table of one adapter and the forward that puts it into the KV cache."""

    def __init__(self, config: PrefixTuningConfig, model: Transformer):
        super().__init__()
        cfg = model.config
        width = cfg.num_key_value_heads * cfg.head_dim
        config.fill(num_layers=cfg.num_hidden_layers, token_dim=width, num_attention_heads=cfg.num_key_value_heads)
        config.encoder_hidden_size = config.encoder_hidden_size or width
        self.num_virtual_tokens, self.num_layers = config.num_virtual_tokens, cfg.num_hidden_layers
        self.n_kv, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        P, out, kw = config.num_virtual_tokens, cfg.num_hidden_layers * 2 * width, dict(device=_device(model))
        self.transform: Optional[nn.Sequential] = None
        if config.prefix_projection:
            self.embedding = nn.Embedding(P, width, **kw)
            hidden = config.encoder_hidden_size
            self.transform = nn.Sequential(nn.Linear(width, hidden, **kw), nn.Tanh(), nn.Linear(hidden, out, **kw))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(P, out, **kw)
            last = self.embedding
        if config.init_weights == "zero":  # what PEFT zeroes: the table, or the MLP's last layer
            for p in last.parameters():
                nn.init.zeros_(p)

    def table(self) -> torch.Tensor:
        """(P, L·2·n_kv·hd): every layer's prefix keys and values, flattened as PEFT stores them."""
        E = self.embedding.weight
        return E if self.transform is None else self.transform(E)

    def fill_cache(self, cache: KVCache, batch_size: int, dtype: torch.dtype) -> None:
        """Put layer i's prefix keys/values (B, n_kv, P, hd) into an empty cache."""
        kv = self.table().to(dtype).view(self.num_virtual_tokens, 2 * self.num_layers, self.n_kv, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (L·2, n_kv, P, hd)
        for i in range(self.num_layers):
            k, v = kv[2 * i], kv[2 * i + 1]
            cache.update(i, k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))

    def forward(self, model: Transformer, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                return_hidden: bool = False, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab). A cache passed in must be empty or already hold this prefix."""
        if model.gradient_checkpointing and model.training:
            raise ValueError("prefix tuning feeds the prefix through the KV cache, which gradient checkpointing "
                             "does not support; turn model.gradient_checkpointing off")
        x = input_ids if inputs_embeds is None else inputs_embeds
        cache = KVCache(self.num_layers) if cache is None else cache
        if cache.length == 0:
            dtype = model.model.embed_tokens.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
            self.fill_cache(cache, x.shape[0], dtype)
        attention_mask, position_ids = _with_virtual_tokens(self.num_virtual_tokens, attention_mask, position_ids)
        return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     inputs_embeds=inputs_embeds,
                     return_hidden=return_hidden, logits_to_keep=logits_to_keep)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table()}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load `prompt_embeddings`; with a projection the file holds its output, so the MLP is folded away."""
        table = tensors["prompt_embeddings"]
        if self.transform is not None:
            self.transform = None
            self.embedding = nn.Embedding(*table.shape, device=self.embedding.weight.device)
        self.embedding.weight.data.copy_(table)


class PromptEmbedding(nn.Module):
    """The soft prompt (P, d) of one adapter and the forward that prepends it to the input embeddings."""

    def __init__(self, config: PromptTuningConfig, model: Transformer):
        super().__init__()
        cfg = model.config
        config.fill(num_layers=cfg.num_hidden_layers, token_dim=cfg.hidden_size,
                    num_attention_heads=cfg.num_attention_heads)
        self.num_virtual_tokens = P = config.num_virtual_tokens
        self.embedding = nn.Embedding(P, cfg.hidden_size, device=_device(model))  # "RANDOM": N(0, 1), as PEFT
        if config.prompt_tuning_init != "RANDOM" and not config.inference_mode:
            words = model.model.embed_tokens.weight
            ids = self._init_ids(config, cfg.vocab_size).to(words.device)
            self.embedding.weight.data.copy_(words[ids].float())

    @staticmethod
    def _init_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor:
        """P token ids whose embeddings start the prompt: random ones, or the text's repeated/trimmed to P."""
        P = config.num_virtual_tokens
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            return torch.randint(0, vocab_size, (P,))
        tokenizer = load_tokenizer(config.tokenizer_name_or_path)
        ids = tokenizer.encode(config.prompt_tuning_init_text, bos=tokenizer.bos_id is not None)
        if max(ids) >= vocab_size:
            raise ValueError(f"tokenizer {config.tokenizer_name_or_path} gives token id {max(ids)}, but the model "
                             f"has only {vocab_size} embeddings: is it the model's tokenizer?")
        return torch.tensor(ids * math.ceil(P / len(ids)))[:P]

    def forward(self, model: Transformer, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                return_hidden: bool = False, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) of the real tokens. A non-empty cache already holds the prompt."""
        P = self.num_virtual_tokens
        attention_mask, position_ids = _with_virtual_tokens(P, attention_mask, position_ids)
        if cache is not None and cache.length > 0:
            return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds,
                         return_hidden=return_hidden, logits_to_keep=logits_to_keep)
        x = model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B = x.shape[0]
        prompt = self.embedding.weight.to(x.dtype).expand(B, -1, -1)
        check_position_ids(position_ids, B, x.shape[1])  # before they are joined to the virtual ones
        if position_ids is not None:
            virtual = torch.arange(P, device=position_ids.device, dtype=position_ids.dtype).expand(len(position_ids), P)
            position_ids = torch.cat((virtual, position_ids), dim=1)
        T = x.shape[1]  # the real tokens: never keep the prompt's positions
        return model(inputs_embeds=torch.cat((prompt, x), dim=1), attention_mask=attention_mask,
                     position_ids=position_ids, cache=cache, return_hidden=return_hidden,
                     logits_to_keep=min(logits_to_keep, T) or T)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.embedding.weight.data.copy_(tensors["prompt_embeddings"])

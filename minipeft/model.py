"""The LLaMA-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

    x = embed_tokens(ids)                                    # (B, T, d)
    for each layer:
        x = x + o_proj(Attention(RoPE(q_proj(n1(x))), RoPE(k_proj(n1(x))), v_proj(n1(x))))
        x = x + down_proj(silu(gate_proj(n2(x))) * up_proj(n2(x)))
    logits = lm_head(norm(x))                                # (B, T, vocab)

Module names are Hugging Face's (`model.layers.{i}.self_attn.q_proj`, ...), q/k/v separate, so
state-dict keys map one to one onto a checkpoint and `target_modules=["q_proj","v_proj"]` works.
Tested against `transformers`' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM
(tests/test_model_parity.py): float32 logits within 1e-4.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .fused import rms_norm, rope, swiglu
from .rope_scaling import rope_frequencies


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 like the reference, then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # backward derived by hand: minipeft.fused


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: Optional[dict] = None):
    """cos, sin of shape (B, T, head_dim/2) for angles pos · f_i, f_i = theta^(-2i/head_dim), i < head_dim/2
    (f_i rescaled by `scaling`, config.rope_scaling: minipeft.rope_scaling).

    Computed in float32 from the positions each call (no buffer: a model built on the meta device
    needs nothing re-initialized after loading). Pair i is (x_i, x_{i+hd/2}), Hugging Face's
    "rotate_half" layout, whose cos/sin repeat these halves twice.
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by their angle: (x1 cos - x2 sin, x2 cos + x1 sin).
    x: (B, H, T, hd); cos, sin: (B, T, hd/2). The backward rotates back (minipeft.fused)."""
    return rope(x, cos[:, None], sin[:, None])


def last_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, -n:], or x itself for n = 0 (all): a slice, even a full one, would cost its backward
    a zero-filled copy of the gradient."""
    return x[:, -n:] if n else x


class KVCache:
    """Keys and values of the positions seen so far, one (B, n_kv_heads, S, head_dim) pair per layer.

    It may start non-empty: prefix tuning pre-fills every layer with its learned prefix.
    """

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search, or dropping finished sequences)."""
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, q_out, kv_out = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv_out, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, d, bias=cfg.o_proj_bias)

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], cache: Optional[KVCache], layer: int,
                keep: int = 0):
        """Outputs (B, Tq, d) for the last Tq = keep positions of x (B, T, d) (keep = 0: all T), which
        attend to keys and values of all of them; mask (B, 1, Tq, S) when given."""
        B, T, _ = x.shape
        xq, cq, sq = last_positions(x, keep), last_positions(cos, keep), last_positions(sin, keep)
        Tq = xq.shape[1]
        q = self.q_proj(xq).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tq, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd), S = past + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), the product by fused.swiglu (one activation fewer kept)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, keep: int = 0):
        """x (B, T, d) -> (B, Tq, d), the last Tq = keep positions (keep = 0: all T)."""
        x = last_positions(x, keep) + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of a checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(mask2d: torch.Tensor, T: int, sliding_window: Optional[int]) -> torch.Tensor:
    """(B, S) keep-mask over past + current keys -> (B, 1, T, S) boolean mask for the last T queries.

    Query t sits at index S - T + t. It sees key j when j <= its index (causal), the key is not
    padding, and (Mistral) it lies inside the sliding window. A query that would see nothing (a pad
    position in a left-padded row) sees itself, so softmax stays finite; its output is never used.
    """
    S = mask2d.shape[1]
    q_idx = torch.arange(S - T, S, device=mask2d.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=mask2d.device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None] & mask2d[:, None, :].bool()  # (B, T, S)
    allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]


def check_position_ids(position_ids: Optional[torch.Tensor], B: int, T: int) -> None:
    """position_ids, when given, must be (B, T), or (1, T) shared by every row (as in transformers).
    (T,) would line up with the heads, not the rows: a crash, or wrong logits where T equals the head
    count (so in transformers too)."""
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[0] not in (1, B)
                                     or position_ids.shape[1] != T):
        raise ValueError(f"position_ids must be (batch, T) = {(B, T)}, or (1, T) = {(1, T)} shared by every row; "
                         f"got {tuple(position_ids.shape)}" + (" (for a 1-D arange(T), pass arange(T)[None])"
                                                               if position_ids.dim() == 1 else ""))


class Transformer(nn.Module):
    """Causal language model: `model(input_ids, attention_mask)` -> logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward: memory for time
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # N(0, 0.02) like HF's initializer_range; a model built on "meta" skips real allocation.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """input_ids (B, T), or inputs_embeds (B, T, d) -> logits (B, T, vocab), or with
        return_hidden the final normed hidden states (B, T, d) that lm_head maps to logits (the
        training loss applies lm_head only where a token is supervised: metrics.head_loss).

        logits_to_keep = n > 0 (Hugging Face's name): only the last n positions, (B, n, ...). Their
        outputs equal the full run's, yet the last layer computes queries, attention, o_proj and
        the MLP for those n only: no later layer reads the others. In fine-tuning, where the prompt
        is not scored, that skips much of a layer (metrics.scored_suffix); in generation, all of
        the prompt's last layer but one position.

        attention_mask (B, S) marks real tokens (1) and padding (0) over the cached past and the
        current T tokens, S = cache.length + T. Positions count real tokens only: a left-padded
        row starts at position 0 at its first real token, as Hugging Face's generate does.
        A boolean (B, 1, T, S) attention_mask is used as it is (packed rows, with their
        position_ids: see minipeft.batching). position_ids, given: (B, T), or (1, T) for every row.
        """
        if (input_ids is None) == (inputs_embeds is None):  # as transformers: both would leave one unused
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        check_position_ids(position_ids, B, T)
        past = 0 if cache is None else cache.length
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0: all positions), got {logits_to_keep}")
        keep = 0 if logits_to_keep >= T else logits_to_keep
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a 4-D attention_mask (packed rows) needs position_ids")
            return self._run(x, position_ids, attention_mask, cache, return_hidden, keep)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            # A mask of the new tokens only would broadcast over the cached keys (padding seen) and count
            # positions from 0: wrong logits, no error.
            raise ValueError(f"attention_mask must be (batch, cache.length + T) = {(B, past + T)}, covering the "
                             f"cached positions too; got {tuple(attention_mask.shape)}")
        if attention_mask is not None and past == 0 and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: SDPA's causal kernel, ~1.4x faster than a mask tensor
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mask = None
        if attention_mask is not None or past > 0 or self.config.sliding_window is not None:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.bool, device=x.device)
            mask = attention_mask_4d(attention_mask, T, self.config.sliding_window)
        return self._run(x, position_ids, mask, cache, return_hidden, keep)

    def _run(self, x: torch.Tensor, position_ids: torch.Tensor, mask: Optional[torch.Tensor],
             cache: Optional[KVCache], return_hidden: bool, keep: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype,
                                self.config.rope_scaling)
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            k = keep if i == last else 0
            if k:  # the last k queries: their rows of the mask, causal from their offset
                if mask is None:
                    mask = attention_mask_4d(torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device),
                                             x.shape[1], None)
                mask = mask[:, :, -k:]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, None, i, k, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, k)
        if keep and not self.model.layers:  # no last layer to drop the other positions
            x = x[:, -keep:]
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def get_output_embeddings(self) -> nn.Module:
        """lm_head (Hugging Face's name): maps return_hidden's states to logits."""
        return self.lm_head

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """See `minipeft.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, path, max_shard_size: Union[int, str] = 2 * 1024**3) -> None:
        """Write `config.json` + `model.safetensors` (sharded above max_shard_size: bytes, or "5GB", "5GiB")."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

"""LoRA on an embedding table (`embed_tokens`), as Hugging Face PEFT's `lora.Embedding`.

An embedding is a Linear applied to one-hot rows: embed(ids) = onehot(ids) W, with W (V, d) the
table (num_embeddings V, embedding_dim d). LoRA's update to it is a rank-r table ΔW = s · (B A)ᵀ:

    ids (...,) ──► W[ids]                       (..., d)   frozen
              └──► Aᵀ[ids]  (..., r)  @ Bᵀ (r, d) · s        A (r, V) = lora_embedding_A: zeros
    y = W[ids] + s · Aᵀ[ids] Bᵀ                              B (d, r) = lora_embedding_B: N(0, 1)

The init is the transpose of the Linear case's (there A random, B zero), as in loralib and PEFT:
the branch starts at 0 either way, and with A (one column per token) the zero factor, row v of
ΔW = s · (B A[:, v])ᵀ stays exactly 0 until token v is seen, while B trains. Trainable parameters:
r · (V + d). No dropout: the input is token ids, and PEFT, though it builds the dropout module
from lora_dropout, never applies it to an embedding's branch. Merging adds ΔW (V, d) to W
(LoraLayer.merge). Files hold the bare parameters, `<path>.lora_embedding_A` and
`<path>.lora_embedding_B` (no `.weight`: PEFT keeps them in nn.ParameterDicts).

Tied embeddings (lm_head shares W): the branch changes only the lookup, lm_head keeps W. PEFT
merges ΔW into the shared tensor, which moves lm_head too; here merge_adapter refuses and
merge_and_unload gives embed_tokens its own merged copy (PeftModel.merge_and_unload), so the
merged model computes what base + adapter did. Tested in tests/test_lora_embedding.py against peft.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraConfig, LoraLayer


class LoraEmbedding(LoraLayer):
    """An nn.Embedding base layer with named LoRA adapters (module docstring)."""

    adapter_module_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()

    @property
    def weight(self) -> nn.Parameter:
        """The frozen table (V, d), for code that reads `embed_tokens.weight` (prefix tuning's dtype,
        prompt tuning's init from vocabulary rows), as PEFT's tuner layers expose their base's."""
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        # float32 whatever the table's dtype, as LoraLinear's adapters (and PEFT's autocast_adapter_dtype).
        kw = dict(dtype=torch.float32, device=self.base_layer.weight.device)
        # Both drawn N(0, 1) before the init, as PEFT draws them: the same seed gives the same adapter.
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(config.r, self.in_features, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, config.r, **kw))
        self.scaling[name] = config.scaling
        self.reset_lora_parameters(name, config.init_lora_weights)

    def reset_lora_parameters(self, name: str, init: Union[bool, str]) -> None:
        """A zeros, B N(0, 1) (drawn again) for every init but False, as PEFT: its Linear-only inits
        ("gaussian", "orthogonal", "eva") fall back to this one on an embedding. False: A and B keep
        their N(0, 1) draws from add_adapter, not a no-op."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if A.is_meta or init is False:
            return
        nn.init.zeros_(A)
        nn.init.normal_(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · (B A)ᵀ, shape (V, d) as the table, in float32."""
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return self.scaling[name] * (B @ A).T

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) -> (..., d): W[ids] + s · Aᵀ[ids] Bᵀ, summed in float32, cast to the table's dtype."""
        name, base = self.active_adapter, self.base_layer
        y = base(ids)
        if self.disabled or name is None or self.merged_adapters:
            return y
        # A's columns are looked up as the base looks up W's rows: the padding token's column gets no
        # gradient and scale_grad_by_freq applies alike (PEFT passes the base's options the same way).
        rows = F.embedding(ids, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                           scale_grad_by_freq=base.scale_grad_by_freq)  # (..., r)
        # (rows Bᵀ) · s in that order and one cast of the float32 sum, as PEFT: bit-equal outputs.
        return (y + rows @ self.lora_embedding_B[name].T * self.scaling[name]).to(y.dtype)

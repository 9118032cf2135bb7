"""Merging LoRA into the base weights: merge/unmerge the active adapter in place, or hand back a
plain model (merge_and_unload, unload). A mixin of PeftModel (peft_model.py), whose adapters it reads.

Merging folds ΔW = s·B·A into W (W <- W + ΔW, float32, cast back), so a forward costs one matmul;
unmerging subtracts it again.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from .adapter import BottleneckAdapter
from .linear4bit import dequantize_model
from .lora import LoraConfig, LoraLayer
from .model import Transformer
from .targets import set_submodule


class MergeMixin:
    """PeftModel's merge methods; they use its tuner_layers(), base_model, active_adapter and
    active_peft_config."""

    def _merged(self) -> list[str]:
        return sorted({a for _, layer in self.tuner_layers() for a in layer.merged_adapters})

    def _unmerge_with_warning(self) -> None:
        """PEFT's reaction to an adapter set (or added) on a merged model: warn, then unmerge every layer."""
        if self._merged():
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
            self.unmerge_adapter()

    def _tied_lora_layers(self) -> list[tuple[str, LoraLayer]]:
        """The active LoRA layers whose base weight another module shares (lm_head tied to
        embed_tokens, either one targeted): ΔW merged into that tensor would move the other module too."""
        uses = Counter(id(p) for _, p in self.base_model.named_parameters(remove_duplicate=False))
        return [(path, layer) for path, layer in self.tuner_layers() if isinstance(layer, LoraLayer)
                and layer.active_adapter and layer.has_dense_weight
                and uses[id(layer.base_layer.weight)] > 1]

    def merge_adapter(self) -> None:
        """Fold the active LoRA adapter into the base weights (reversible: unmerge_adapter)."""
        if not isinstance(self.active_peft_config, LoraConfig):
            raise ValueError(f"{self.active_peft_config.peft_type} has no weight update to merge; only LoRA merges")
        tied = [path for path, _ in self._tied_lora_layers()]
        if tied:
            raise ValueError(f"{tied} share their weight with another module (tie_word_embeddings): merging ΔW into "
                             "it would change that module too; merge_and_unload() unties them first")
        for _, layer in self.tuner_layers():
            if isinstance(layer, LoraLayer) and layer.active_adapter:
                layer.merge(layer.active_adapter)

    def unmerge_adapter(self) -> None:
        for _, layer in self.tuner_layers():
            layer.unmerge()

    def merge_and_unload(self) -> Transformer:
        """The base model with the active adapter merged in and every wrapper removed: a model to save.

        Every 4-bit layer comes back as a 16/32-bit Linear holding the weight it computed with (the
        logits do not change), targeted or not: an NF4 model has no checkpoint form, and re-quantizing
        a merged weight, as PEFT does for bitsandbytes, would round most of ΔW away (LoraLinear.unloaded).
        A modules_to_save copy of lm_head or embed_tokens unties them: config.tie_word_embeddings
        is then cleared, as in PEFT, so that the checkpoint keeps both. So does LoRA on a tied
        lm_head or embed_tokens: its ΔW is merged into a copy of the shared weight, the other module
        keeps the original (PEFT merges into the shared tensor, which moves the other one too).

        Inactive adapters are dropped, as PEFT drops them, even those that could not merge (a bottleneck
        adapter beside the active LoRA one). Every refusal comes before any layer changes.
        """
        config = self.active_peft_config
        if config.is_prompt_learning:
            raise ValueError(f"{config.peft_type} adds virtual tokens; it has no weights to merge")
        if not isinstance(config, LoraConfig):
            raise ValueError(f"{config.peft_type} adapter {self.active_adapter!r} cannot be merged: it is not a "
                             "linear function of the input; unload() removes it")
        broken = [path for path, layer in self.tuner_layers() if isinstance(layer, LoraLayer) and layer.active_adapter
                  and not torch.isfinite(layer.delta_weight(layer.active_adapter)).all()]
        if broken:  # LoraLayer.merge would refuse too, but only once it reached them
            raise ValueError(f"merging adapter {self.active_adapter!r} gives non-finite weights in {broken}; "
                             "the adapter is broken")
        for _, layer in self._tied_lora_layers():
            layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)
        for path, layer in list(self.tuner_layers()):
            # Layers of another method hold only inactive adapters here (one method per module).
            set_submodule(self.base_model, path, layer.base_layer if isinstance(layer, BottleneckAdapter)
                          else layer.unloaded())
        model = dequantize_model(self.base_model)
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.config.tie_word_embeddings = False
        return model

    def unload(self) -> Transformer:
        """The base model back, every wrapper removed, nothing merged: a modules_to_save module
        comes back as the original, not the trained copy (PEFT 0.22; 0.21 returned the copy)."""
        for path, layer in list(self.tuner_layers()):
            layer.unmerge()
            set_submodule(self.base_model, path, layer.base_layer)
        return self.base_model

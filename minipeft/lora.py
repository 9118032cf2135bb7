"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al. 2021, arXiv:2106.09685).

         x ──────────────┬──────────────┐
         │               │              │ dropout (LoRA branch only)
    W (out, in), frozen  │      A (r, in)   Kaiming-uniform init
         │               │      B (out, r)  zeros init: the layer starts as an exact no-op
         ▼               │              ▼
    y = x Wᵀ + b   +   s · (x Aᵀ) Bᵀ,     s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Trainable parameters per layer: r · (in + out), e.g. 2 · d · r for a square d × d projection.
Merging folds ΔW = s · B A into W (computed in float32, cast back, refused if non-finite);
unmerging subtracts it again. Names, shapes and files follow Hugging Face PEFT, and
tests/test_lora_peft.py proves equal logits and loadable files in both directions.
LoRA on an embedding table (`embed_tokens`) is minipeft.lora_embedding.LoraEmbedding; both share
LoraLayer (scaling, merging into a dense weight), which picks the wrapper for each targeted module.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from typing import Optional, Union

import torch
from torch import nn

from .functional import add_lora, dropout_mask, lora_linear, nf4_lora_linear
from .linear4bit import Linear4bit
from .peft_config import ANY, PeftConfig
from .targets import is_linear
from .tuner_layer import TunerLayer


INITS = (True, False, "gaussian", "orthogonal", "eva")
EMBEDDINGS = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES: the layers weight tying concerns


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    r: int = 8  # rank of the update B A
    lora_alpha: float = 8  # scaling numerator: s = lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    target_modules: Optional[Union[list[str], str]] = None  # names, a regex, or "all-linear"; None: q/v
    use_rslora: bool = False  # s = lora_alpha / sqrt(r) (Kalajdzievski 2023): stable across ranks
    # True: Kaiming A, zero B; "gaussian": N(0, 1/r) A; "orthogonal": B A = 0 from orthogonal halves;
    # "eva": only loadable (its A comes from data); False: random B
    init_lora_weights: Union[bool, str] = True
    bias: str = "none"  # "none" | "all" | "lora_only": which biases also train
    modules_to_save: Optional[list[str]] = None  # whole modules trained and saved too (e.g. ["lm_head"])
    # LoRA only in these decoder layers (an index or a list; None or []: all), and the name(s) of the
    # list holding them (None: any), for a list of target_modules, as PEFT (minipeft.targets)
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    # modules taken out of target_modules' selection: a regex for the full name, or names/suffixes (minipeft.targets)
    exclude_modules: Optional[Union[list[str], str]] = None
    # Per-module r and lora_alpha, {regex: value}: a module takes the first key matching the end of its
    # name after a dot, as PEFT's get_pattern_key (re.match(rf"(.*\.)?({key})$", name)); others r, lora_alpha
    rank_pattern: Optional[dict[str, int]] = dataclasses.field(default_factory=dict)
    alpha_pattern: Optional[dict[str, float]] = dataclasses.field(default_factory=dict)
    # PEFT's: on a model with tied embeddings, LoRA (or modules_to_save) on lm_head or embed_tokens gets a twin
    # on the other, sharing its weights. Not implemented: refused there (check_model); elsewhere a no-op, warned of.
    ensure_weight_tying: bool = False
    peft_type = "LORA"
    # The rest of PEFT's LoraConfig (peft_config.py): features we lack, harmless only at these values
    # (DoRA, lora_bias, ...), and fields no value of which changes the numbers here (ANY): eva_config only
    # parameterizes an init a loaded adapter's weights replace (init_lora_weights="eva" is refused itself);
    # use_qalora and qalora_group_size act on GPTQ layers only; runtime_config (GPU offload) is never saved;
    # loftq_config only parameterizes init_lora_weights="loftq" (refused): otherwise PEFT warns and drops it;
    # fan_in_fan_out is for GPT-2's Conv1D: PEFT warns and sets it False on an nn.Linear, drops it on an Embedding.
    peft_fields = {
        **PeftConfig.peft_fields,
        "use_dora": (False, None), "lora_bias": (False,), "target_parameters": (None, []),
        "trainable_token_indices": (None,), "layer_replication": (None,), "alora_invocation_tokens": (None,),
        "use_bdlora": (None, False), "megatron_config": (None,), "corda_config": (None,),
        "arrow_config": (None,), "kasa_config": (None,), "lora_ga_config": (None,), "monteclora_config": (None,),
        "velora_config": (None,), "astra_config": (None,),
        **dict.fromkeys(("eva_config", "megatron_core", "use_qalora", "qalora_group_size", "runtime_config",
                         "fan_in_fan_out", "loftq_config"), ANY),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive_int("r")
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in INITS:
            # PiSSA, OLoRA, LoftQ, CorDA... rewrite the base weights too: their adapter is wrong on the original base.
            raise ValueError(f"LoraConfig: init_lora_weights must be one of {INITS} (inits that leave the base "
                             f"weights unchanged), got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        self._check_layers()

    def _check_layers(self) -> None:
        """layers_to_transform holds layer indices; as in PEFT, both fields filter a list of target_modules
        names (not a regular expression or "all-linear"), and layers_pattern needs layers_to_transform."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        indices = layers if isinstance(layers, list) else [layers]
        if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ValueError(f"LoraConfig: layers_to_transform must be an int or a list of ints, got {layers!r}")
        if isinstance(self.target_modules, str) and (layers is not None or pattern is not None):
            raise ValueError(f"LoraConfig: layers_to_transform and layers_pattern need target_modules to be a list "
                             f"of names, got target_modules={self.target_modules!r} with layers_to_transform="
                             f"{layers!r}, layers_pattern={pattern!r}")
        if pattern and layers is None:
            raise ValueError(f"LoraConfig: layers_pattern needs layers_to_transform (the indices of the layers "
                             f"in {pattern!r} to adapt), got None")

    def check_model(self, model: nn.Module) -> None:
        """PEFT's weight-tying checks (BaseTuner._check_tied_modules), with its warnings: they concern lm_head
        and embed_tokens, by last name in target_modules and modules_to_save, or a target_modules regex."""
        def named(names: list[str]) -> bool:
            return any(m.split(".")[-1] in EMBEDDINGS for m in names)

        targets = self.target_modules
        in_adapter = named(self.modules_to_save or []) or (
            any(re.fullmatch(targets, m) for m in EMBEDDINGS) if isinstance(targets, str) else named(targets or []))
        tied = model.config.tie_word_embeddings
        if self.ensure_weight_tying and tied and in_adapter:
            # PEFT then adds the tied twin (LoRA on embed_tokens too): another model, which minipeft lacks
            raise ValueError(f"LoraConfig: ensure_weight_tying=True with target_modules={targets!r}, modules_to_save="
                             f"{self.modules_to_save!r} on a model with tied embeddings (lm_head is embed_tokens) is "
                             "not supported by minipeft: PEFT ties the adapters of the two; set it False")
        if self.ensure_weight_tying:  # no effect, as in PEFT
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model"
                          if not tied else "You have requested `ensure_weight_tying`, but no tied modules are "
                          "added in either `modules_to_save` or `target_modules`")
        elif tied and in_adapter:
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                          "`ensure_weight_tying` is not set to True. This can lead to complications, for example "
                          "when merging the adapter or converting your model to formats other than safetensors. "
                          "Check the discussion here: https://github.com/huggingface/peft/issues/2777")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_module(self, name: str) -> "LoraConfig":
        """This config with r and lora_alpha as rank_pattern and alpha_pattern set them for module `name`."""
        def pick(pattern: dict, default: float) -> float:
            return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)

        if not (self.rank_pattern or self.alpha_pattern):
            return self
        return dataclasses.replace(self, r=pick(self.rank_pattern, self.r),
                                   lora_alpha=pick(self.alpha_pattern, self.lora_alpha))


def _orthogonal_init(in_features: int, r: int, out_features: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "orthogonal" init, draw for draw: Q (r, r) orthogonal, A = (G_A Q_odd)ᵀ / 10 (r, in),
    B = G_Bᵀ Q_even / 10 (out, r) with Gaussian G_A (in, r/2), G_B (r/2, out). Odd and even rows of Q
    are orthogonal, so B A = G_Bᵀ Q_even Q_oddᵀ G_Aᵀ / 100 = 0: the layer starts as a no-op, A and B not 0."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank r, got {r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(in_features, r // 2).mm(Q[0::2]).T / 10.0
    B = torch.randn(r // 2, out_features).T.mm(Q[1::2]) / 10.0
    return A.contiguous().to(device), B.contiguous().to(device)


class LoraLayer(TunerLayer):
    """What LoRA shares over any base layer: a scaling s per adapter, ΔW = s · B A in the base weight's
    layout (`delta_weight`), and merging ΔW into a dense (16/32-bit) base weight W, in place:
    W <- W + ΔW computed in float32 and cast back (refused if non-finite), undone by W <- W - ΔW."""

    wraps = "Linear or Embedding"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.scaling: dict[str, float] = {}

    @classmethod
    def layer_for(cls, module: nn.Module) -> Optional[type[TunerLayer]]:
        """LoraEmbedding for an nn.Embedding, LoraLinear for a Linear or a 4-bit Linear, else None."""
        from .lora_embedding import LoraEmbedding  # it builds on this module

        if isinstance(module, nn.Embedding):
            return LoraEmbedding
        return LoraLinear if is_linear(module) else None

    @property
    def has_dense_weight(self) -> bool:
        """Whether the base weight is a tensor a merge can write into (not NF4 buffers)."""
        return not isinstance(self.base_layer, Linear4bit)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name`, the base weight's shape, in float32."""
        raise NotImplementedError  # abstract: LoraLinear (s B A) and LoraEmbedding (s (B A)ᵀ) define it

    def merge(self, name: Optional[str] = None) -> None:
        """W <- W + ΔW in float32, cast back. Merging an already merged adapter does nothing."""
        name = name or self.active_adapter
        if name in self.merged_adapters:
            return
        if self.merged_adapters:
            raise ValueError(f"adapter {self.merged_adapters[0]!r} is already merged; unmerge it first")
        if not self.has_dense_weight:
            raise ValueError("a 4-bit base weight cannot take a reversible merge; use merge_and_unload(), "
                             "which returns a 16/32-bit layer")
        W = self.base_layer.weight
        merged = W.float() + self.delta_weight(name)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken")
        W.data.copy_(merged.to(W.dtype))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W <- W - ΔW: restores W up to one rounding of its dtype."""
        for name in self.merged_adapters:
            W = self.base_layer.weight
            W.data.copy_((W.float() - self.delta_weight(name)).to(W.dtype))
        self.merged_adapters = []

    def unloaded(self) -> nn.Module:
        """The base layer with the active adapter merged in."""
        if self.active_adapter is not None:
            self.merge(self.active_adapter)
        return self.base_layer


class LoraLinear(LoraLayer):
    """A Linear (or 4-bit Linear) base layer with named LoRA adapters."""

    adapter_module_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout: dict[str, float] = {}  # rate p per adapter (the mask: minipeft.functional)

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        # Adapter weights are float32 whatever the base dtype: tiny updates to B A would round away
        # in bf16 (PEFT's autocast_adapter_dtype does the same).
        device = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())).device
        kw = dict(bias=False, dtype=torch.float32, device=device)
        self.lora_A[name] = nn.Linear(self.in_features, config.r, **kw)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, **kw)
        self.lora_dropout[name] = config.lora_dropout
        self.scaling[name] = config.scaling
        self.reset_lora_parameters(name, config.init_lora_weights)

    def reset_lora_parameters(self, name: str, init: Union[bool, str]) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if A.is_meta:
            return
        if init == "eva":
            raise ValueError("init_lora_weights='eva' sets A from the SVD of each layer's inputs over data (PEFT's "
                             "initialize_lora_eva_weights), which minipeft does not implement; use True or "
                             "'gaussian' (an adapter trained with 'eva' loads: from_pretrained)")
        if init == "orthogonal":
            a, b = _orthogonal_init(A.shape[1], A.shape[0], B.shape[0], A.device)
            A.data.copy_(a), B.data.copy_(b)
            return
        if init is False:
            # Not a no-op (for tests and experiments): A and B keep nn.Linear's own init, drawn as they were
            # built; as PEFT, which leaves them so: the same seed gives its draws.
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own init, as in PEFT
        nn.init.zeros_(B)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.lora_dropout[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B A, shape (out, in), in float32."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused on CUDA by the Triton kernels, else their PyTorch twin (minipeft.functional)."""
        name, base = self.active_adapter, self.base_layer
        if self.disabled or name is None or self.merged_adapters:
            return base(x)
        lora = (self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.lora_dropout[name],
                self.training)
        if isinstance(base, nn.Linear):
            return lora_linear(x, base.weight, base.bias, *lora)
        if x.dtype != base.compute_dtype:
            # A float32 model quantized with compute_dtype=bfloat16 (QLoRA's usual setup). As PEFT over
            # bitsandbytes: the 4-bit matmul runs in compute_dtype and comes back in x's dtype, and the LoRA
            # branch (functional.add_lora), from x itself, is added there. Fused in compute_dtype, the update
            # would be rounded to bfloat16's step of the base output (|y|/256), most of a small one lost.
            A, B, scaling, p, training = lora
            return add_lora(base(x), x, A, B, scaling, *dropout_mask(x, p, training))
        bias = None if base.bias is None else base.bias.to(base.compute_dtype)  # QLoRA: compute in compute_dtype
        return nf4_lora_linear(x, base.quantized_weight, bias, *lora)

    def unloaded(self) -> nn.Module:
        """The base layer with the active adapter merged in, as a plain nn.Linear.

        For a 4-bit base the result is a new 16/32-bit Linear holding dequantize(W) + ΔW. It is
        not quantized back: ΔW is far smaller than NF4's step (absmax/8 at best), so rounding the
        sum to 4 bits would mostly erase the fine-tune, and unmerging could not recover it.
        """
        name = self.active_adapter
        if self.has_dense_weight:
            return super().unloaded()
        W = self.base_layer.dequantize().float()
        if name is not None:
            W = W + self.delta_weight(name)
        if not torch.isfinite(W).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken")
        return self.base_layer.to_linear(W)

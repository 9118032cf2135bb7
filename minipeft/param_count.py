"""How many parameters each method trains, on real model sizes, without allocating them.

Every count is taken from a model built on the meta device (shapes only, no memory) with the
method attached exactly as `get_peft_model` attaches it, so the numbers are what training would
see. QLoRA trains what LoRA trains and counts its 4-bit weights at their unquantized element
count (tests/test_qlora.py checks the equality on a real quantized model), so its row is LoRA's.
`frozen_weight_bytes` gives the memory of the frozen base in bf16, NF4 and NF4 + double quant.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

from .argtypes import MAX_COUNT, at_least
from .config import PRESETS, ModelConfig
from .model import Transformer
from .nf4 import nf4_nbytes
from .peft_model import count_parameters, format_trainable, full_finetune, get_peft_model

# (label, method, options): the rows of benchmarks/param_count.py
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("full", "full", {}),
    ("LoRA r=8 q,v", "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("LoRA r=16 q,v", "lora", {"r": 16, "target_modules": ["q_proj", "v_proj"]}),
    ("LoRA r=8 all-linear", "lora", {"r": 8, "target_modules": "all-linear"}),
    ("QLoRA r=8 q,v", "qlora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("Houlsby adapter m=64", "adapter", {"bottleneck_size": 64, "placement": "houlsby"}),
    ("Houlsby adapter m=384", "adapter", {"bottleneck_size": 384, "placement": "houlsby"}),  # ~3% of 7B
    ("Pfeiffer adapter m=64", "adapter", {"bottleneck_size": 64, "placement": "pfeiffer"}),
    ("prefix tuning 20", "prefix", {"num_virtual_tokens": 20}),
    ("prompt tuning 20", "prompt", {"num_virtual_tokens": 20}),
]


def method_config(method: str, **options: Any):
    """The PEFT config of `method` ("lora", "qlora", "adapter", "prefix", "prompt") with `options`."""
    if method in ("lora", "qlora"):
        from .lora import LoraConfig

        return LoraConfig(lora_alpha=32, **options)
    if method == "adapter":
        from .adapter import AdapterConfig

        return AdapterConfig(**options)
    if method == "prefix":
        from .prompt_learning import PrefixTuningConfig

        return PrefixTuningConfig(**options)
    if method == "prompt":
        from .prompt_learning import PromptTuningConfig

        return PromptTuningConfig(**options)
    raise ValueError(f"unknown method {method!r}; expected full, lora, qlora, adapter, prefix or prompt")


def count_method(preset: str, method: str, **options: Any) -> tuple[int, int]:
    """(trainable, all) parameters of `preset` with `method` attached, built on the meta device."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(preset))
        if method == "full":
            return count_parameters(full_finetune(model))
        return count_parameters(get_peft_model(model, method_config(method, **options)))


def frozen_weight_bytes(preset: str) -> dict[str, int]:
    """Bytes of the frozen base: all bf16; or every Linear but lm_head in NF4 (+ double quant)."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(preset))
    linears = [m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    total = sum(p.numel() for p in model.parameters())
    rest = 2 * (total - sum(linears))  # embeddings, norms, biases, lm_head stay bf16
    return {"bf16": 2 * total,
            "nf4": rest + sum(nf4_nbytes(n, double_quant=False) for n in linears),
            "nf4+dq": rest + sum(nf4_nbytes(n, double_quant=True) for n in linears)}


# Each method's flags, with their defaults: a flag given for another method would be ignored
METHOD_FLAGS = {"r": (("lora", "qlora"), 8), "target_modules": (("lora", "qlora"), "q_proj,v_proj"),
                "bottleneck_size": (("adapter",), 64), "placement": (("adapter",), "houlsby"),
                "num_virtual_tokens": (("prefix", "prompt"), 20)}


def _count_params(args: argparse.Namespace) -> int:
    for flag, (methods, default) in METHOD_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
        elif args.method not in methods:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --method {' or '.join(methods)}, "
                             f"not {args.method}: it would be ignored")
    options: dict[str, Any] = {}
    if args.method in ("lora", "qlora"):
        # "q_proj, v_proj" as one writes a list: " v_proj" would match no module, and only q_proj be counted
        names = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        if not names:  # else "target_modules=[] matched no module", which names no flag
            raise ValueError(f"--target-modules {args.target_modules!r}: no module name; expected comma-separated "
                             "names (q_proj,v_proj) or all-linear")
        targets = "all-linear" if names == ["all-linear"] else names
        options = {"r": args.r, "target_modules": targets}
    elif args.method == "adapter":
        options = {"bottleneck_size": args.bottleneck_size, "placement": args.placement}
    elif args.method in ("prefix", "prompt"):
        options = {"num_virtual_tokens": args.num_virtual_tokens}
    print(format_trainable(*count_method(args.preset, args.method, **options)))
    return 0


def register(sub: argparse._SubParsersAction, name: Optional[str] = "count-params") -> None:
    p = sub.add_parser(name, help="trainable / all parameters of a preset with a method, PEFT's line")
    # choices: argparse refuses an unknown name (exit 2, the names listed) before anything is built
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), metavar="NAME",
                   help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora", "adapter", "prefix", "prompt"])
    # Defaults in METHOD_FLAGS: None here tells a flag given for another method from one left out
    p.add_argument("--r", type=at_least(1, MAX_COUNT), help="LoRA rank (lora, qlora; default 8)")
    p.add_argument("--target-modules", help="comma-separated names, or all-linear (lora, qlora; default q_proj,v_proj)")
    p.add_argument("--bottleneck-size", type=at_least(1, MAX_COUNT), help="adapter width (adapter; default 64)")
    p.add_argument("--placement", choices=["houlsby", "pfeiffer"], help="adapter placement (default houlsby)")
    p.add_argument("--num-virtual-tokens", type=at_least(1, MAX_COUNT), help="prefix, prompt (default 20)")
    p.set_defaults(func=_count_params)

"""`minipeft train` (a job file -> a job directory) and `minipeft merge` (base + adapter -> one
checked Hugging Face checkpoint). Merging is where fine-tuning tools most often go wrong, so the
merge is proven before it is moved into place: the checkpoint written, read back, must reproduce
base + adapter's logits on a probe batch, else nothing is written unless --force."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from .argtypes import finite_float, nonempty
from .checkpoint import WEIGHT_FILES, load_pretrained, read_config
from .files import check_output_dir, staged_dir
from .job import QUANTIZATIONS, default_model_dir, load_trained, run_job
from .linear4bit import Linear4bit
from .peft_config import PeftConfig
from .peft_files import adapter_directory
from .peft_model import format_trainable
from .templates import TEMPLATE_FILE, load_template, save_template
from .train_config import TrainConfig

PROBE = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
         '{"name": "Ada", "age": 36}', "Fine-tuning changes a model's behaviour."]


def _train(args: argparse.Namespace) -> int:
    from . import distributed

    cfg = TrainConfig.load(args.config, refuse_ignored=True)  # a person's job file: every key is meant to apply
    if args.output_dir:
        cfg.output_dir = args.output_dir
    try:
        job = run_job(cfg, resume=args.resume)
        rank = distributed.rank()
    finally:
        distributed.finish()
    if rank == 0:
        r = job.result
        print(format_trainable(job.trainable, job.total))
        print(f"steps {r.steps} | train loss {r.train_loss:.4f} | " +
              " | ".join(f"{k} {v:.4f}" for k, v in r.eval.items()) + f" | {r.tokens_per_second:.0f} tok/s")
        for w in r.warnings:
            print(f"warning: {w}")
        print(f"job directory: {job.output_dir}")
    return 0


def merge_checked(base_dir: Optional[str], adapter_dir: str, output: str, max_diff: float, force: bool,
                  quantization: str = "auto") -> dict[str, float]:
    """Merge, write to a staging directory beside `output`, read it back and check it on PROBE; move
    it into place only if both checks pass (or with force). Returns the comparisons.

    Two checks, each of max |logit diff| <= max_diff and every greedy token the same, both computed
    in float32 whatever the checkpoint's dtype (16-bit arithmetic alone moves logits by ~1e-2, which
    would fail a right merge or hide a wrong one):
        merge     the merged model in memory, before rounding, against base + adapter: the merge's math;
        written   the checkpoint read back against the merged model rounded to the checkpoint's dtype,
                  what was meant to be written: what saving lost (a tensor, a config field).
    A 16-bit checkpoint also differs from base + adapter by the rounding of W + ΔW to 16 bits: that
    is measured and printed (rounding), as the cost of the dtype, not a fault of the merge.

    The base loads as the adapter was trained (job.base_quantization): a QLoRA adapter merges into
    the dequantized NF4 weights, so the checkpoint computes what was trained and evaluated.
    The adapter's chat template (chat_template.json) goes with it: eval and the platform prompt a
    model directory with its own, so the merged model is prompted as the adapter was trained."""
    output_path = check_output_dir(output, "--output")  # before the model loads
    # Over the base, the merge would replace the model the adapter applies to (the shipped one, by
    # default); over the adapter, it would mix a model's files into the adapter's.
    for flag, why, directory in (("--base", "replace the base model", default_model_dir(base_dir)),
                                 ("--adapter", "mix a model into the adapter", Path(adapter_dir))):
        if output_path.resolve() == directory.resolve():
            raise ValueError(f"--output {output}: is the {flag} directory; the merge would {why}: "
                             "choose another directory")
    read_config(default_model_dir(base_dir))  # a missing base or adapter failed after the other had loaded
    PeftConfig.load(adapter_directory(adapter_dir))
    peft_model, tok = load_trained(base_dir, adapter_dir, quantization=quantization, log=print)
    dtype = peft_model.base_model.model.embed_tokens.weight.dtype  # the checkpoint's (never quantized)
    if not any(isinstance(m, Linear4bit) for m in peft_model.modules()):
        peft_model.float()  # a QLoRA base computes in its compute dtype; its merge is float32 already
    ids, mask = tok.batch_encode(PROBE, padding_side="right", bos=True)
    real = mask.bool()

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, attention_mask=mask)[real].float()

    expected = logits(peft_model)
    merged = peft_model.merge_and_unload()
    checks = {"merge": _compare(logits(merged), expected)}
    merged.to(dtype)  # what is written: W + ΔW rounded once to the checkpoint's dtype
    with staged_dir(output_path, stale=WEIGHT_FILES) as staging:  # a refused check writes nothing
        merged.save_pretrained(staging)
        tok.save_pretrained(staging)
        if (Path(adapter_dir) / TEMPLATE_FILE).is_file():
            save_template(staging, load_template(adapter_dir))
        rounded = logits(merged.float())
        del merged
        # the files, not the model in memory: saving is where a merge can be lost
        got = logits(load_pretrained(staging, dtype=torch.float32, device=expected.device))
        checks["written"] = _compare(got, rounded)
        checks["rounding"] = _compare(got, expected)
        print(f"merge check on {int(real.sum())} probe tokens (float32; checkpoint {str(dtype).split('.')[-1]}): "
              + "; ".join(f"{name} max |logit diff| {d:.2e}, greedy agreement {a:.2%}" for name, (d, a) in checks.items()))
        failed = [name for name in ("merge", "written") if checks[name][0] > max_diff or checks[name][1] < 1.0]
        if failed and not force:
            raise ValueError(f"merged checkpoint fails the {' and '.join(failed)} check (max |logit diff| above "
                             f"{max_diff:.0e} or a greedy token changed); nothing written (use --force to write anyway)")
    print(f"merged checkpoint written to {output}")
    return {"max_abs_logit_diff": max(checks["merge"][0], checks["written"][0]),
            "greedy_token_agreement": min(checks["merge"][1], checks["written"][1]),
            "rounding_max_abs_logit_diff": checks["rounding"][0], "rounding_greedy_token_agreement": checks["rounding"][1]}


def _compare(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |logit diff|, share of tokens whose greedy choice agrees), over (tokens, vocab) logits."""
    return float((got - expected).abs().max()), float((got.argmax(-1) == expected.argmax(-1)).float().mean())


def _merge(args: argparse.Namespace) -> int:
    merge_checked(args.base, args.adapter, args.output, args.max_diff, args.force, args.quantization)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune a model from a job file (JSON or YAML)")
    t.add_argument("--config", required=True, type=nonempty("a job file"), help="job file with TrainConfig's keys")
    t.add_argument("--output-dir", type=nonempty("a directory"), help="overrides output_dir of the job file")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.set_defaults(func=_train)
    m = sub.add_parser("merge", help="merge an adapter into its base model, checked, as a Hugging Face checkpoint")
    m.add_argument("--base", type=nonempty("a model directory"), help="base model directory (default: the shipped model)")
    m.add_argument("--adapter", required=True, type=nonempty("an adapter directory"))
    m.add_argument("--output", required=True, type=nonempty("a directory"))
    m.add_argument("--max-diff", type=finite_float(0.0), default=1e-3,
                   help="largest |logit| difference accepted by the merge and written checks, in float32 "
                        "(a right merge lands ~1e-6)")
    m.add_argument("--force", action="store_true", help="write even if the check fails")
    m.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="how the base loads: auto (default: NF4 when the adapter records a QLoRA base), none, nf4")
    m.set_defaults(func=_merge)

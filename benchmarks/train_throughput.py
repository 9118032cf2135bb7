"""Training throughput and peak memory of one step: minipeft vs transformers + peft, and
minipeft's methods side by side, on the same random model and batch.

    python benchmarks/train_throughput.py [--quick] [--device cpu|cuda] [--steps N] [--providers NAME ..] [--out DIR]

One question: how fast does a fine-tuning step run here, and at what memory? Each provider runs
in its own process (so peak RSS / CUDA peak memory is its own), builds the same config with the
same seed and warms up; then the providers take full steps (forward, backward, AdamW) in turn,
one each per sweep, for --steps sweeps (lockstep: a shared machine whose speed drifts, as this
project's does by +-20% from minute to minute, slows all of them alike). Reported: p20/p50/p80
seconds, tokens/s (every token of the batch), and the speed against transformers + peft LoRA:
the median over sweeps of the paired ratio of step times, with the p20-p80 of those ratios.

The batch is a fine-tuning batch: the first half of every row is the prompt (labels -100), the
second half the scored reply (the bundled tasks score 6-35% of their tokens); the LoRA pair also
runs on a batch whose every token is scored (pretraining-style). Each tool computes its loss its
own way: transformers with `labels=` (logits at every position), minipeft as its Trainer does
(`metrics.head_loss`: logits only at scored positions; `metrics.scored_suffix`: the last layer
only from the first of them on). The "compiled" pair puts each model through torch.compile
(Inductor; minipeft's head_loss stays eager), against each other. Where the time goes (torch.profiler over 2 more steps): the
matrix multiplies (aten::mm, addmm, bmm) per step, their FLOPs, the rate they ran at and their
share of the time: equal rates and fewer FLOPs mean less arithmetic, not faster arithmetic.
Results: benchmarks/results/train_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from provenance import cpu_name, git_commit  # benchmarks/provenance.py, beside this script

OUT = Path(__file__).parent / "results"
CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
PROVIDERS = ["hf+peft lora", "minipeft lora", "minipeft full", "minipeft qlora", "minipeft adapter",
             "minipeft prefix", "hf+peft lora, all scored", "minipeft lora, all scored",
             "hf+peft lora, compiled", "minipeft lora, compiled"]
PROMPT_FRACTION = 0.5  # of each row, masked from the loss (except in the "all scored" rows)


def build(provider: str, device: str, base: str, compiled: bool = False):
    """(model, loss(ids, labels)) for the provider, seeded identically (QLoRA loads the same weights
    from `base`, quantizing each as it reads it); compiled: the model's forward through torch.compile
    (Inductor), its backward too, the loss as each tool computes it."""
    torch.manual_seed(0)
    if provider.startswith("hf"):
        import peft
        import transformers

        from minipeft import ModelConfig

        hf_cfg = transformers.AutoConfig.for_model(**ModelConfig(**CONFIG).to_hf_config())
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
        forward = torch.compile(model) if compiled else model.to(device)
        return model.to(device), lambda ids, labels: forward(input_ids=ids, labels=labels).loss
    from minipeft import ModelConfig, Transformer, load_pretrained
    from minipeft.metrics import head_loss, scored_suffix
    from minipeft.param_count import method_config
    from minipeft.peft_model import full_finetune, get_peft_model

    method = provider.split()[1]
    if method == "qlora":  # the float32 model never exists whole here, as when QLoRA loads a real base
        model = load_pretrained(base, device=device, quantization="nf4")
    else:
        model = Transformer(ModelConfig(**CONFIG)).to(device)
    options = {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "adapter": {"bottleneck_size": 64},
               "prefix": {"num_virtual_tokens": 20}}
    options["qlora"] = options["lora"]
    model = full_finetune(model) if method == "full" else get_peft_model(model, method_config(method, **options[method]))
    forward = torch.compile(model) if compiled else model

    def loss(ids, labels):  # head_loss stays eager: its selection of the scored positions is data-dependent
        n = scored_suffix(labels)
        return head_loss(forward(ids, return_hidden=True, logits_to_keep=n), labels[:, -n:], model.get_output_embeddings())
    return model, loss


def reference(provider: str) -> str:
    """transformers + peft LoRA on the same batch as `provider`, compiled if it is."""
    return "hf+peft lora" + provider[len(provider.split(",")[0]):]


def worker(provider: str, device: str, batch: int, seq: int, base: str) -> None:
    """A fresh process for one provider, driven over stdin: "step" runs one timed training step and
    prints its seconds; "end" profiles 2 more steps and prints the JSON row (peak memory included)."""
    # Imported before the baseline, as the libraries' memory is not training's: torch._dynamo (~140 MiB)
    # too, which transformers imports and torch.optim otherwise does at its first step.
    for library in (["transformers", "peft"] if provider.startswith("hf") else []) + ["minipeft.peft_model",
                                                                                      "torch._dynamo"]:
        importlib.import_module(library)
    libraries = torch.cuda.memory_allocated() if device == "cuda" else resident_bytes()
    model, loss = build(provider.split(",")[0], device, base, compiled=provider.endswith("compiled"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    if not provider.endswith("all scored"):
        labels[:, :int(PROMPT_FRACTION * seq)] = -100

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss(ids, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up (and compilation)
        step()
    print("ready", flush=True)
    for command in sys.stdin:
        if command.strip() == "end":
            break
        print(step(), flush=True)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    with torch.profiler.profile(with_flops=True) as prof:
        for _ in range(2):
            step()
    ops = prof.key_averages()
    matmuls = [e for e in ops if e.key in MATMULS]
    self_time = (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    mm_time, flops = sum(map(self_time, matmuls)), sum(e.flops for e in matmuls)  # microseconds, FLOPs
    print(json.dumps({"provider": provider, "peak_bytes": peak, "libraries_bytes": libraries,
                      "matmul_share": mm_time / max(sum(map(self_time, ops)), 1),
                      "matmuls_per_step": sum(e.count for e in matmuls) // 2,
                      "matmul_gflop_per_step": flops / 2e9, "matmul_gflops": flops / max(mm_time, 1) / 1e3}),
          flush=True)


def lockstep(device: str, quick: bool, steps: int, providers: list[str], base: str) -> tuple[dict, dict]:
    """Start one worker per provider, then time their steps in turn: sweep s runs one step of every
    provider, in reverse order on odd sweeps. A machine whose speed drifts (a shared host) slows
    every provider alike, which separate runs one after another cannot promise."""
    cmd = [sys.executable, __file__, "--device", device, "--base", base] + (["--quick"] if quick else [])
    procs = {}
    for p in providers:  # built one at a time: each waits idle, holding its memory, until the sweeps
        procs[p] = subprocess.Popen(cmd + ["--worker", p], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if procs[p].stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker {p!r} failed to start (its stderr is above)")
    times: dict[str, list[float]] = {p: [] for p in providers}
    for sweep in range(steps):
        for p in providers if sweep % 2 == 0 else providers[::-1]:
            procs[p].stdin.write("step\n")
            procs[p].stdin.flush()
            times[p].append(float(procs[p].stdout.readline()))
        if sweep % 10 == 9:
            print(f"sweep {sweep + 1}/{steps}: " + ", ".join(f"{p} {t[-1]:.3f}s" for p, t in times.items()))
    rows = {}
    for p, proc in procs.items():
        out, _ = proc.communicate("end\n")
        rows[p] = json.loads(out.strip().splitlines()[-1])
    return times, rows


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), else its peak so far."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def p20_p80(xs: list[float]) -> list[float]:
    """The 20th and 80th percentiles of xs, interpolated between its values (as numpy and triton's
    do_bench do): the default method, "exclusive", extrapolates past the smallest and largest of 2 or 3
    values, and raises on one (--steps 1)."""
    if len(xs) == 1:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return [q[1], q[7]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps, smaller batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="timed steps of every provider (sweeps); default 30, 5 with --quick")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, metavar="NAME",
                    help=f"a subset of {PROVIDERS}, each with its hf+peft reference")
    ap.add_argument("--out", type=Path, default=OUT, help="where the .md and .json results go")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: serve one provider's steps
    ap.add_argument("--base", help=argparse.SUPPRESS)  # internal: the checkpoint QLoRA loads
    args = ap.parse_args()
    batch, seq = (2, 128) if args.quick else (4, 256)
    steps = (5 if args.quick else 30) if args.steps is None else args.steps
    if steps < 1:  # checked before any worker starts: an empty timing would fail only at the end
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if args.worker:
        return worker(args.worker, args.device, batch, seq, args.base)
    providers = [p for p in PROVIDERS if p in args.providers]
    wanted = set(args.providers) | {reference(p) for p in providers}
    if wanted - set(providers):
        ap.error(f"--providers: unknown or missing {sorted(wanted - set(providers))}; choose from {PROVIDERS}")
    with tempfile.TemporaryDirectory() as base:
        if "minipeft qlora" in providers:  # QLoRA loads its base as users do, from a checkpoint
            from minipeft import ModelConfig, Transformer

            torch.manual_seed(0)  # build()'s seed: the weights the other rows start from
            Transformer(ModelConfig(**CONFIG)).save_pretrained(base)
        times, by_name = lockstep(args.device, args.quick, steps, providers, base)
    for p, r in by_name.items():  # against transformers + peft on the same batch, paired by sweep
        ref = reference(p)
        (p20, p80), ratios = p20_p80(times[p]), [a / b for a, b in zip(times[ref], times[p])]
        r.update(p20_s=p20, p50_s=statistics.median(times[p]), p80_s=p80)
        r["tokens_per_s"] = batch * seq / r["p50_s"]
        r["speed_vs_hf_peft"] = statistics.median(ratios)
        r["speed_p20_p80"] = p20_p80(ratios)  # their spread: how far one run's median can be trusted
        r["training_bytes"] = r["peak_bytes"] - r["libraries_bytes"]  # model, activations, gradients, optimizer
        r["memory_vs_hf_peft"] = r["training_bytes"] / by_name[ref]["training_bytes"]
    rows = list(by_name.values())
    commit = git_commit()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    meta = {"device": args.device, "machine": machine, "torch": torch.__version__, "commit": commit,
            "batch": batch, "seq": seq, "prompt_fraction": PROMPT_FRACTION, "steps": steps, "config": CONFIG}
    lines = [f"# One training step, {args.device} ({machine}); torch {torch.__version__}, commit {commit}", "",
             f"batch {batch} x {seq} tokens, the first {PROMPT_FRACTION:.0%} of each row prompt (not scored) except in "
             f"the \"all scored\" rows; model {CONFIG}; each provider in its own process, {steps} steps each "
             "taken in turn (one step of every provider per sweep, the order reversed every other sweep); "
             "speed vs hf+peft lora on the same batch (compiled rows: vs its compiled row): the median over sweeps of its step time / this one's; "
             "peak MiB: the process's peak (RSS on the CPU, where the imported libraries count too); libraries "
             "MiB: its memory once they were imported, before the model; training MiB: the peak less that (model, "
             "activations, gradients, optimizer), which memory vs hf+peft compares", "",
             "| provider | p20 s | p50 s | p80 s | tokens/s | peak MiB | libraries MiB | training MiB "
             "| speed vs hf+peft | its p20-p80 | memory vs hf+peft | matmuls / step | matmul GFLOP / step | matmul GFLOP/s | matmul share of time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['provider']} | {r['p20_s']:.3f} | {r['p50_s']:.3f} | {r['p80_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {r['libraries_bytes'] / 2**20:.0f} | {r['training_bytes'] / 2**20:.0f} | "
              f"{r['speed_vs_hf_peft']:.2f}x | "
              f"{r['speed_p20_p80'][0]:.2f}-{r['speed_p20_p80'][1]:.2f} | {r['memory_vs_hf_peft']:.2f}x | "
              f"{r['matmuls_per_step']} | {r['matmul_gflop_per_step']:.1f} | {r['matmul_gflops']:.0f} | "
              f"{100 * r['matmul_share']:.0f}% |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    from minipeft.files import json_bytes, write_atomic  # here: a worker's imports are measured

    write_atomic(args.out / f"train_throughput{suffix}.md", text)
    write_atomic(args.out / f"train_throughput{suffix}.json", json_bytes({"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()

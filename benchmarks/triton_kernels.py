"""Benchmark of minipeft's Triton kernels against eager PyTorch, torch.compile, the bare GEMM and bitsandbytes.

    python benchmarks/triton_kernels.py [--quick] [--out benchmarks/results]

Problems: LLaMA-7B projections K -> N: 4096->4096 (q/k/v/o_proj), 4096->11008 (gate/up_proj), 11008->4096
(down_proj); tokens M in {1, 16, 512, 4096}; LoRA rank r in {8, 16, 64}; bfloat16 everywhere; modes
    forward   inference forward (no autograd graph)
    backward  dL/dx, dL/dA, dL/dB of a recorded forward (W frozen: no dW)
    full      recorded forward + backward (one training step of the layer)
Methods, side by side in one run:
    base          the frozen GEMM alone: x W^T (+ dY W in backward), the limit any LoRA layer approaches
    eager         PEFT's LoRA: F.linear(x, W) + F.linear(F.linear(x, A), B) * s (three GEMMs and an add)
    compile       torch.compile(eager)
    fused         minipeft.kernels.lora.lora_linear, its default U strategy for this M
    fused_u_loop  U = x A^T recomputed in the K loop / fused_u_pre: U precomputed (data for XA_IN_LOOP_MAX_M)
    nf4_fused     QLoRA, NF4 tiles dequantized inside the GEMM / nf4_dequant: dequantize kernel, then GEMM
    bnb_nf4       bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + eager LoRA
Metrics: triton.testing.do_bench quantiles p20/p50/p80 (ms); TFLOP/s and GB/s at p50 from ideal counts;
ratios of p50 to base and to eager for the same problem and mode (NF4 rows too: base is the bf16 GEMM/GEMV).
    FLOPs: forward 2MNK + 2Mr(K+N); backward 2MNK + 4Mr(K+N); full the sum; base 2MNK per GEMM.
    bytes: each operand and result moved once (x, W, A, B, y; backward dY, W, x, A, B, dX, dA, dB), an NF4 W
    at 4.127 bits per weight.
Writes <out>/kernels_<gpu>.json (rows + GPU, torch, triton, bitsandbytes versions, git commit), .md, .png.
Without CUDA it says so, runs a small correctness pass of the kernels on Triton's interpreter (each path, with and
without a bias), exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minipeft.files import json_bytes, write_atomic
from provenance import git_commit  # benchmarks/provenance.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
TOKENS = [1, 16, 512, 4096]
RANKS = [8, 16, 64]
MODES = ["forward", "backward", "full"]
DEVICE = "cuda"
QUICK = dict(shapes=[(4096, 4096)], tokens=[1, 512], ranks=[16], modes=["forward", "full"])
SCALING = 2.0
NF4_BITS = 4.127


def eager_lora(x, weight, lora_A, lora_B, scaling: float):
    return F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * scaling


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def correctness_pass(device: str) -> None:
    """NF4 dequantization bit for bit, then every path of the kernels, each without and with a (trained)
    bias, forward and backward against float64 autograd: fused LoRA, fused QLoRA (NF4 tiles dequantized in
    the K loop) and QLoRA's dequantize-then-GEMM (the dequantization kernel, then the dense kernel). Small odd
    shapes, bfloat16; tolerance 2^-6 normwise (see tests/test_kernels_lora.py)."""
    klora, nf4 = importlib.import_module("minipeft.kernels.lora"), importlib.import_module("minipeft.nf4")
    knf4 = importlib.import_module("minipeft.kernels.nf4")
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 19, 72, 40, 8
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, torch.bfloat16).requires_grad_()
    x, w, a, b, bias = t(m, k), t(n, k, scale=k ** -0.5), t(r, k, scale=k ** -0.5), t(n, r, scale=r ** -0.5), t(n)
    q = nf4.quantize_nf4(w.detach())
    w_q = nf4.dequantize_nf4(q, torch.bfloat16)
    grad_out = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    if not torch.equal(knf4.dequantize_nf4(q, torch.bfloat16).view(torch.int16), w_q.view(torch.int16)):
        raise SystemExit("correctness pass FAILED: NF4 dequantization kernel differs from minipeft.nf4")
    print("  NF4 dequantization kernel: bit for bit equal to minipeft.nf4.dequantize_nf4")
    paths = {"fused LoRA": (lambda x, a, b, c: klora.lora_linear(x, w, c, a, b, SCALING), w),
             "fused QLoRA": (lambda x, a, b, c: klora.nf4_lora_linear(x, q, c, a, b, SCALING, fused=True), w_q),
             "QLoRA dequantize + GEMM": (lambda x, a, b, c: klora.nf4_lora_linear(x, q, c, a, b, SCALING,
                                                                                  fused=False), w_q)}
    present = lambda *vs: [v for v in vs if v is not None]
    results = {}
    for name, (fn, weight) in paths.items():
        for c in (None, bias):
            y = fn(x, a, b, c)
            got = [y, *torch.autograd.grad(y, present(x, a, b, c), grad_out)]
            x64, a64, b64, c64 = (None if v is None else v.detach().double().requires_grad_() for v in (x, a, b, c))
            y64 = eager_lora(x64, weight.detach().double(), a64, b64, SCALING) + (0.0 if c is None else c64)
            want = [y64, *torch.autograd.grad(y64, present(x64, a64, b64, c64), grad_out.double())]
            results[f"{name}, {'no bias' if c is None else 'bias'}"] = max(rel_err(u, v) for u, v in zip(got, want))
    for name, err in results.items():
        print(f"  {name}: forward and backward within {err:.1e} (normwise) of float64 autograd")
    if any(err > 2 ** -6 for err in results.values()):
        raise SystemExit("correctness pass FAILED")
    print("  correctness pass OK")


def bench(fn, mode: str, x, lora_A, lora_B, grad_out):
    """(p20, p50, p80) ms of `fn(x, A, B)` in `mode` (see the module docstring)."""
    from triton.testing import do_bench
    inputs = (x, lora_A, lora_B)
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(*inputs)
    elif mode == "backward":
        y = fn(*inputs)
        run = lambda: torch.autograd.grad(y, inputs, grad_out, retain_graph=True, allow_unused=True)
    else:
        run = lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out, allow_unused=True)
    return do_bench(run, quantiles=[0.2, 0.5, 0.8])


def flops_bytes(mode: str, method: str, m: int, k: int, n: int, r: int) -> tuple[float, float]:
    """Ideal FLOPs and bytes of one call (module docstring)."""
    w_bytes = n * k * (NF4_BITS / 8 if method.startswith(("nf4", "bnb")) else 2)
    if method == "base":
        gemms = 1 if mode != "full" else 2
        return 2.0 * m * n * k * gemms, gemms * (w_bytes + 2 * (m * k + m * n))
    fwd = (2.0 * m * n * k + 2.0 * m * r * (k + n), w_bytes + 2 * (m * k + r * (k + n) + m * n))
    bwd = (2.0 * m * n * k + 4.0 * m * r * (k + n), w_bytes + 2 * (m * n + 2 * m * k + 2 * r * (k + n)))
    if mode == "forward":
        return fwd
    return bwd if mode == "backward" else (fwd[0] + bwd[0], fwd[1] + bwd[1])


def make_methods(weight: torch.Tensor, have_bnb: bool) -> dict:
    """name -> fn(x, A, B) for the methods of the module docstring."""
    klora, nf4 = importlib.import_module("minipeft.kernels.lora"), importlib.import_module("minipeft.nf4")
    q = nf4.quantize_nf4(weight)
    # The backward mode replays one recorded graph (retain_graph=True), which compiled backwards with
    # donated buffers refuse; without donation the compiled backward may allocate one buffer more.
    importlib.import_module("torch._functorch.config").donated_buffer = False
    compiled = torch.compile(eager_lora)
    methods = {
        "base": lambda x, a, b: F.linear(x, weight),
        "eager": lambda x, a, b: eager_lora(x, weight, a, b, SCALING),
        "compile": lambda x, a, b: compiled(x, weight, a, b, SCALING),
        "fused": lambda x, a, b: klora.lora_linear(x, weight, None, a, b, SCALING),
        "fused_u_loop": lambda x, a, b: klora.lora_linear(x, weight, None, a, b, SCALING, xa_in_loop=True),
        "fused_u_pre": lambda x, a, b: klora.lora_linear(x, weight, None, a, b, SCALING, xa_in_loop=False),
        "nf4_fused": lambda x, a, b: klora.nf4_lora_linear(x, q, None, a, b, SCALING, fused=True),
        "nf4_dequant": lambda x, a, b: klora.nf4_lora_linear(x, q, None, a, b, SCALING, fused=False),
    }
    if have_bnb:
        import bitsandbytes as bnb
        n, k = weight.shape
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4", blocksize=64,
                                         compress_statistics=True)
        layer = layer.to(weight.device)
        methods["bnb_nf4"] = lambda x, a, b: layer(x) + F.linear(F.linear(x, a), b) * SCALING
    return methods


def bench_problem(methods: dict, mode: str, x, lora_A, lora_B, grad_out) -> list[dict]:
    """One row per method for one problem and mode, with its ratios to base and eager."""
    (m, k), (n, r) = x.shape, lora_B.shape
    rows = []
    for name, fn in methods.items():
        p20, p50, p80 = bench(fn, mode, x, lora_A, lora_B, grad_out)
        flops, nbytes = flops_bytes(mode, name, m, k, n, r)
        rows.append(dict(K=k, N=n, M=m, r=r, mode=mode, method=name, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                         tflops=flops / p50 / 1e9, gbps=nbytes / p50 / 1e6))
    p50 = {row["method"]: row["p50_ms"] for row in rows}
    for row in rows:
        row.update(x_base=row["p50_ms"] / p50["base"], x_eager=row["p50_ms"] / p50["eager"])
        print(f"K={k:5d} N={n:5d} M={m:4d} r={r:2d} {mode:8s} {row['method']:12s} p50 {row['p50_ms']:8.4f} ms "
              f"{row['tflops']:7.1f} TFLOP/s {row['gbps']:7.0f} GB/s x{row['x_base']:.2f} base "
              f"x{row['x_eager']:.2f} eager", flush=True)
    return rows


def run_benchmarks(plan: dict) -> list[dict]:
    """All rows of the plan: shapes x tokens x ranks x modes x methods."""
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    rows = []
    for k, n in plan["shapes"]:
        weight = (torch.randn(n, k, device=DEVICE) * k ** -0.5).to(torch.bfloat16)
        methods = make_methods(weight, have_bnb)
        for m in plan["tokens"]:
            for r in plan["ranks"]:
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                lora_A = (torch.randn(r, k, device=DEVICE) * k ** -0.5).to(torch.bfloat16).requires_grad_()
                lora_B = (torch.randn(n, r, device=DEVICE) * r ** -0.5).to(torch.bfloat16).requires_grad_()
                grad_out = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
                for mode in plan["modes"]:
                    rows += bench_problem(methods, mode, x, lora_A, lora_B, grad_out)
    return rows


def metadata() -> dict:
    import triton

    commit = git_commit()
    bnb = importlib.util.find_spec("bitsandbytes") and importlib.import_module("bitsandbytes").__version__
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, bitsandbytes=bnb, git_commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def markdown(meta: dict, rows: list[dict]) -> str:
    """One table per (mode, shape): rows (M, r), a column per method: 'p50 ms (x base)'."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    lines = ["# minipeft kernel benchmark", "", *(f"- {key}: {value}" for key, value in meta.items()), "",
             "Cells: p50 time in ms (ratio to the bare bf16 GEMM). Full rows with p20/p80, TFLOP/s, GB/s: JSON.", ""]
    for mode in dict.fromkeys(row["mode"] for row in rows):
        for shape in dict.fromkeys((row["K"], row["N"]) for row in rows):
            lines += [f"## {mode}, K={shape[0]} -> N={shape[1]}", "", "| M | r | " + " | ".join(methods) + " |",
                      "|---|---|" + "---|" * len(methods)]
            cells = {}
            for row in rows:
                if row["mode"] == mode and (row["K"], row["N"]) == shape:
                    cells.setdefault((row["M"], row["r"]), {})[row["method"]] = row
            for (m, r), by_method in cells.items():
                lines.append(f"| {m} | {r} | " + " | ".join(
                    f"{by_method[name]['p50_ms']:.4f} ({by_method[name]['x_base']:.2f})" if name in by_method
                    else "-" for name in methods) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict]) -> bytes:
    """p50 / base against M, one panel per (mode, shape), one line per method, at the middle rank: a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    shapes = list(dict.fromkeys((row["K"], row["N"]) for row in rows))
    ranks = sorted({row["r"] for row in rows})
    rank = ranks[len(ranks) // 2]
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(5 * len(shapes), 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = [row for row in rows if row["mode"] == mode and (row["K"], row["N"]) == shape and row["r"] == rank]
            for name in dict.fromkeys(row["method"] for row in sel):
                pts = sorted((row["M"], row["x_base"]) for row in sel if row["method"] == name)
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}: {shape[0]} -> {shape[1]}, r={rank}")
            ax.set_xlabel("tokens M")
            ax.set_ylabel("p50 time / bf16 GEMM")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return png.getvalue()


def save(rows: list[dict], out: Path) -> None:
    meta = metadata()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("kernels_" + re.sub(r"[^a-z0-9]+", "-", meta["gpu"].lower()).strip("-"))
    write_atomic(stem.with_suffix(".json"), json_bytes({"meta": meta, "rows": rows}))
    write_atomic(stem.with_suffix(".md"), markdown(meta, rows))
    write_atomic(stem.with_suffix(".png"), plot(rows))
    print(f"wrote {stem}.json, .md, .png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 512}, r=16, forward and full")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU: nothing to time. Correctness pass of the kernels on Triton's interpreter (CPU):")
        from minipeft.kernels import triton_interpreter
        with triton_interpreter():
            correctness_pass("cpu")
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}. Correctness pass:")
    correctness_pass("cuda")
    plan = QUICK if args.quick else dict(shapes=SHAPES, tokens=TOKENS, ranks=RANKS, modes=MODES)
    save(run_benchmarks(plan), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What only a CUDA GPU can check, in one run that fits a short device lease: the tests' GPU
cases, the demo, then both benchmarks on the GPU.

    python benchmarks/gpu_check.py [--out DIR] [--skip-benchmarks]

1. pytest on TESTS, which on a machine with a GPU include cases the CPU lacks: a LoRA and a QLoRA
   job trained on the GPU against the same job on the CPU (test_device), data parallelism over NCCL,
   one process per GPU (test_trainer), and the Triton kernels compiled for the GPU rather than
   interpreted (test_kernels_*: they pick CUDA when there is one).
2. `minipeft demo` on the GPU (device auto): the main job end to end, its before/after table in the log
   (its job directory in a temporary folder).
3. benchmarks/triton_kernels.py --quick: the fused LoRA and NF4 kernels against eager PyTorch,
   torch.compile and bitsandbytes.
4. benchmarks/train_throughput.py --device cuda on PROVIDERS: minipeft against transformers + peft.
Everything printed goes to OUT/gpu_check.log too, the benchmarks' tables beside it. Without CUDA
it says so and exits 2: none of this can be checked on a CPU (the CPU cases run in `make test`).

On the device tool's machines (Python 3.12 with torch, triton, transformers, peft and pytest, but
not bitsandbytes; nothing can be downloaded there), from the repository root, with bitsandbytes'
wheel carried in .whl (see the tool's README for `pip download`):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_device.py", "tests/test_trainer.py::test_ddp_equals_one_process",
         "tests/test_kernels_lora.py", "tests/test_kernels_nf4.py"]
PROVIDERS = ["hf+peft lora", "minipeft lora", "minipeft qlora", "hf+peft lora, all scored", "minipeft lora, all scored"]


def steps(out: Path, scratch: Path, benchmarks: bool) -> list[tuple[str, int, list[str]]]:
    """(name, seconds allowed, command) of each check, run from the repository root; scratch: where
    the demo's job directory goes (the device tool brings back a few files from OUT, not a job
    directory). The limits keep one hung check from spending the others' share of a lease."""
    py = sys.executable
    run = [("pytest", 200, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]),
           ("demo", 90, [py, "-m", "minipeft", "demo", "--output-dir", str(scratch / "demo")])]
    if benchmarks:
        run += [("triton_kernels", 130, [py, "benchmarks/triton_kernels.py", "--quick", "--out", str(out)]),
                ("train_throughput", 130, [py, "benchmarks/train_throughput.py", "--device", "cuda", "--out", str(out),
                                           "--providers", *PROVIDERS])]
    return run


def run_step(command: list[str], limit: float, say: Callable[[str], None]) -> int:
    """Run command from the repository root, each line of its output to say(); killed after limit
    seconds, with every process it started (torchrun's ranks hold its output open too), its output
    so far kept. Its exit code: negative when killed."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a process group of its own, to kill whole
    watchdog = threading.Timer(limit, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    for line in proc.stdout:
        say(line.rstrip("\n"))
    watchdog.cancel()
    return proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu", help="log and tables")
    ap.add_argument("--skip-benchmarks", action="store_true", help="the tests and the demo only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; nothing here can run on a CPU")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    with open(args.out / "gpu_check.log", "w", encoding="utf-8") as log:
        def say(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, Python {sys.version.split()[0]}")
        for name, limit, command in steps(args.out, Path(tempfile.mkdtemp()), not args.skip_benchmarks):
            say(f"\n## {name} (at most {limit} s): {' '.join(command)}")
            t0 = time.perf_counter()
            code = run_step(command, limit, say)
            say(f"## {name}: exit {code} after {time.perf_counter() - t0:.0f} s")
            if code:
                failed.append(name)
        say(f"\ngpu_check: {'failed: ' + ', '.join(failed) if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Seconds for dedup.near_duplicate_pairs on synthetic instruction data, per threshold.

    python benchmarks/dedup_speed.py [--n 20000] [--thresholds 0.3 0.5 0.8] [--baseline HEAD]

The data: N short instruction examples (an instruction from 200 templates, an input of 8-40 words
drawn from a Zipf-distributed vocabulary of 20k made-up words, a 2-20 word answer), 2% of them
near copies of an earlier one (1-3 words replaced), normalized and distinct, as report.duplicates
passes them. --baseline REF also times dedup.py as committed at REF (read with `git show`, nothing
checked out) on the same texts, in the same run, so before/after numbers come from one machine.
Seconds are the child's CPU time (the machine may be shared) and wall time. Results:
benchmarks/results/dedup_speed.{md,json} (--out).
Each measurement runs in a child process with a time limit (--timeout) and a 4 GiB address-space
cap: a run past either is reported as such, not waited for.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import resource
import subprocess
import sys
import time
from itertools import accumulate
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))

from minipeft.data.dedup import normalize_text  # noqa: E402
from minipeft.files import json_bytes, write_atomic  # noqa: E402
from provenance import cpu_name, git_commit  # noqa: E402  # benchmarks/provenance.py, beside this script

SYLLABLES = "ka lo mi ne ra to su vi de ba po le ti gu sa mo ri fe na ho ze qu ul an er in or".split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = list(dict.fromkeys("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
                                for _ in range(30000)))[:20000]
    cumulative = list(accumulate(1 / (r + 1) for r in range(len(vocab))))  # Zipf: a few words everywhere

    def words(k: int) -> list[str]:
        return rng.choices(vocab, cum_weights=cumulative, k=k)

    templates = [" ".join(words(rng.randint(4, 10))) for _ in range(200)]
    out: list[str] = []
    while len(out) < n:
        if out and rng.random() < 0.02:  # a near copy: a few words of an earlier example replaced
            copy = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                copy[rng.randrange(len(copy))] = rng.choice(vocab)
            out.append(" ".join(copy))
        else:
            out.append(f"user: {rng.choice(templates)} {' '.join(words(rng.randint(8, 40)))} "
                       f"assistant: {' '.join(words(rng.randint(2, 20)))}")
    return list(dict.fromkeys(normalize_text(t) for t in out))


def load(ref: str | None):
    """minipeft.data.dedup as in the working tree (ref None) or as committed at `ref`."""
    if ref is None:
        from minipeft.data import dedup
        return dedup
    source = subprocess.run(["git", "show", f"{ref}:minipeft/data/dedup.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("minipeft.data._dedup_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "minipeft.data"  # its `from .formats import Example` resolves as in the package
    exec(compile(source, f"{ref}:minipeft/data/dedup.py", "exec"), module.__dict__)
    return module


def one(ref: str | None, n: int, threshold: float) -> None:
    """Child: time one call, print 'CPU-seconds wall-seconds pairs'."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    data, dedup = texts(n), load(ref)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        pairs = len(dedup.near_duplicate_pairs(data, threshold))
    except MemoryError:
        pairs = "MemoryError (4 GiB)"
    print(f"{time.process_time() - cpu:.2f} {time.perf_counter() - start:.2f}", pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    parser.add_argument("--baseline", help="also time dedup.py as committed at this git ref")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=OUT, help="where dedup_speed.md and .json go")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # child: REF|- THRESHOLD
    args = parser.parse_args()
    if args.one:
        return one(None if args.one[0] == "-" else args.one[0], args.n, float(args.one[1]))
    data = texts(args.n)
    lines = [f"# dedup.near_duplicate_pairs on {len(data)} distinct texts (mean {sum(map(len, data)) / len(data):.0f} "
             f"characters), {cpu_name()}, commit {git_commit()}", "",
             "| code | threshold | CPU s | wall s | pairs |", "| --- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    rows = []
    for ref in ([args.baseline] if args.baseline else []) + [None]:
        for t in args.thresholds:
            cmd = [sys.executable, __file__, "--n", str(args.n), "--one", ref or "-", str(t)]
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                result = run.stdout.strip().split(maxsplit=2) if run.returncode == 0 else \
                    ["failed", "-", (run.stderr.strip().splitlines() or ["?"])[-1][:60]]
            except subprocess.TimeoutExpired:
                result = ["-", f"> {args.timeout:.0f}", "time limit"]
            rows.append({"code": ref or "working tree", "threshold": t, "cpu_s": result[0], "wall_s": result[1],
                         "pairs": result[2]})
            lines.append(f"| {ref or 'working tree'} | {t} | {' | '.join(result)} |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "dedup_speed.md", "\n".join(lines) + "\n")
    write_atomic(args.out / "dedup_speed.json", json_bytes({"n": args.n, "texts": len(data), "machine": cpu_name(),
                                                           "commit": git_commit(), "rows": rows}))


if __name__ == "__main__":
    main()

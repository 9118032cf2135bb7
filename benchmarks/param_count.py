"""Trainable / all parameters for every preset x method, and the frozen base's memory.

    python benchmarks/param_count.py

Answers one question: how much does each method train on real model sizes? Models are built on
the meta device (no memory), so this runs anywhere in about a minute. Prints the tables and saves
them to benchmarks/results/param_count.md and .json, then checks the outline's claims:
LoRA ~0.1%, adapters ~3%, prefix tuning < 1%.
"""
from __future__ import annotations

import platform
from pathlib import Path

from minipeft import PRESETS
from minipeft.files import json_bytes, write_atomic
from minipeft.param_count import METHODS, count_method, frozen_weight_bytes

from provenance import git_commit  # benchmarks/provenance.py, beside this script

OUT = Path(__file__).parent / "results"


def main() -> None:
    rows = []
    for preset in PRESETS:
        for label, method, options in METHODS:
            trainable, total = count_method(preset, method, **options)
            rows.append({"preset": preset, "method": label, "trainable": trainable, "all": total,
                         "trainable_pct": 100 * trainable / total})
    memory = {preset: frozen_weight_bytes(preset) for preset in PRESETS}
    commit = git_commit()

    lines = [f"# Parameter counts (meta device; commit {commit}, {platform.machine()})", "",
             "| preset | method | trainable | all | trainable % |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['preset']} | {r['method']} | {r['trainable']:,} | {r['all']:,} | {r['trainable_pct']:.4f} |"
              for r in rows]
    lines += ["", "## Frozen base weights", "", "| preset | bf16 | NF4 | NF4 + double quant | NF4+DQ / bf16 |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p} | {m['bf16'] / 2**30:.2f} GiB | {m['nf4'] / 2**30:.2f} GiB | {m['nf4+dq'] / 2**30:.2f} GiB | "
              f"{m['nf4+dq'] / m['bf16']:.3f} |" for p, m in memory.items()]
    pct = {(r["preset"], r["method"]): r["trainable_pct"] for r in rows}
    lines += ["", "## The outline's claims", "",
              f"- LoRA ~0.1%: llama-2-7b r=8 q,v = {pct['llama-2-7b', 'LoRA r=8 q,v']:.4f}%, "
              f"tinyllama-1.1b = {pct['tinyllama-1.1b', 'LoRA r=8 q,v']:.4f}%",
              f"- Adapter ~3%: llama-2-7b Houlsby m=384 = {pct['llama-2-7b', 'Houlsby adapter m=384']:.2f}%",
              f"- Prefix < 1%: llama-2-7b 20 virtual tokens = {pct['llama-2-7b', 'prefix tuning 20']:.4f}%"]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    write_atomic(OUT / "param_count.md", text)
    write_atomic(OUT / "param_count.json", json_bytes({"commit": commit, "rows": rows, "memory": memory}))


if __name__ == "__main__":
    main()

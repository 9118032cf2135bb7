"""The benchmark scripts run. train_throughput.py end to end (--quick, the LoRA rows), reporting what
the README claims of it that is not a timing: minipeft LoRA multiplies fewer FLOPs a step than
transformers + peft on a fine-tuning batch, as many when every token is scored, and holds less memory.
triton_kernels.py, without a GPU, checks the kernels on Triton's interpreter."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
BENCH = BENCHMARKS / "train_throughput.py"
ROWS = ["hf+peft lora", "minipeft lora", "hf+peft lora, all scored", "minipeft lora, all scored"]


def load_script(name):
    if str(BENCHMARKS) not in sys.path:  # as running it does: its folder first, for provenance.py
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_quick(tmp_path):
    subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu", "--providers", *ROWS,
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "train_throughput_quick.json").read_text())
    rows = {r["provider"]: r for r in result["rows"]}
    cpu, isa, threads = result["meta"]["machine"].split(", ")  # the host is named: ratios differ between hosts
    assert cpu and isa and threads.endswith(" threads")
    assert list(rows) == ROWS and (tmp_path / "train_throughput_quick.md").read_text().count("| minipeft lora") == 2
    ours, ref = rows["minipeft lora"], rows["hf+peft lora"]
    assert ours["matmuls_per_step"] == ref["matmuls_per_step"] == 153
    # the half-prompt batch: lm_head on the scored half only, the last layer from the first scored position on
    assert ours["matmul_gflop_per_step"] < 0.9 * ref["matmul_gflop_per_step"]
    all_ours, all_ref = rows["minipeft lora, all scored"], rows["hf+peft lora, all scored"]
    assert abs(all_ours["matmul_gflop_per_step"] / all_ref["matmul_gflop_per_step"] - 1) < 0.01
    assert ours["memory_vs_hf_peft"] < 1 and all_ours["memory_vs_hf_peft"] < 1
    assert ref["speed_vs_hf_peft"] == 1 and ref["speed_p20_p80"] == [1, 1]
    assert all(r["tokens_per_s"] > 0 and r["speed_p20_p80"][0] <= r["speed_vs_hf_peft"] <= r["speed_p20_p80"][1]
               for r in rows.values())


def test_each_row_is_paired_with_its_hf_peft_twin():
    """The speed and memory ratios divide by transformers + peft on the same batch, compiled if the row is."""
    bench = load_script("train_throughput")
    want = {"minipeft lora": "hf+peft lora", "minipeft qlora": "hf+peft lora", "hf+peft lora": "hf+peft lora",
            "minipeft lora, all scored": "hf+peft lora, all scored",
            "minipeft lora, compiled": "hf+peft lora, compiled"}
    assert {p: bench.reference(p) for p in want} == want
    assert all(bench.reference(p) in bench.PROVIDERS for p in bench.PROVIDERS)


def test_train_throughput_spread_of_few_steps():
    """--steps 1 crashed after every step had run (statistics.quantiles needs two values), and with 2 or 3
    steps the reported p20/p80 lay outside the times measured; --steps 0 silently meant the default."""
    bench = load_script("train_throughput")
    assert bench.p20_p80([0.5]) == [0.5, 0.5]
    for xs in ([1.0, 2.0], [3.0, 1.0, 2.0]):
        p20, p80 = bench.p20_p80(xs)
        assert min(xs) <= p20 <= p80 <= max(xs), (xs, p20, p80)
    assert bench.p20_p80([float(i) for i in range(11)]) == [2.0, 8.0]  # the 20th and 80th percentiles
    run = subprocess.run([sys.executable, str(BENCH), "--steps", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--steps must be at least 1, got 0" in run.stderr, run.stderr


def test_results_name_the_commit_when_run_from_elsewhere(tmp_path, monkeypatch, capsys):
    """The scripts record the commit they ran at; run from outside the repository (python
    /path/to/benchmarks/param_count.py) they asked git in the caller's directory and wrote 'commit ,'."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS, capture_output=True,
                          text=True).stdout.strip()
    count = load_script("param_count")
    monkeypatch.setattr(count, "OUT", tmp_path)
    monkeypatch.chdir(tmp_path)  # no repository here
    count.main()
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "param_count.json").read_text())["commit"].split()[0] == head  # maybe " (dirty)"
    saved = (tmp_path / "param_count.md").read_text()
    assert saved.startswith(f"# Parameter counts (meta device; commit {head}") and saved in printed


def test_script_names_shadow_no_module():
    """A script's folder comes first on sys.path: benchmarks/kernels.py was imported by transformers
    and bitsandbytes in place of the `kernels` package they probe for."""
    for script in BENCHMARKS.glob("*.py"):
        spec = importlib.util.find_spec(script.stem)  # None, or the script itself (its folder on sys.path)
        assert script.stem != "kernels" and (spec is None or Path(spec.origin) == script), script


def test_triton_kernels_without_cuda_checks_the_kernels():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the script turns on Triton's interpreter itself
    run = subprocess.run([sys.executable, str(BENCHMARKS / "triton_kernels.py"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "No CUDA GPU" in run.stdout and "correctness pass OK" in run.stdout
    # every path, each with and without a bias: LoRA, QLoRA fused, QLoRA dequantize-then-GEMM
    for path in ("fused LoRA", "fused QLoRA", "QLoRA dequantize + GEMM"):
        for bias in ("no bias", "bias"):
            assert f"  {path}, {bias}: forward and backward within" in run.stdout, (path, bias, run.stdout)


def test_gpu_check_selects_tests_and_providers_that_exist(tmp_path):
    """gpu_check.py is run only where a GPU is lent: what it names must still exist when it is."""
    check = load_script("gpu_check")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *check.TESTS], cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:]
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    for selected in check.TESTS:  # each selection collects at least one test
        assert any(i.startswith(selected) for i in ids), selected
    throughput = load_script("train_throughput")
    assert set(check.PROVIDERS) <= set(throughput.PROVIDERS)
    assert {throughput.reference(p) for p in check.PROVIDERS} <= set(check.PROVIDERS)
    run = check.steps(tmp_path, tmp_path, benchmarks=True)
    assert [name for name, _, _ in run] == ["pytest", "demo", "triton_kernels", "train_throughput"]
    assert sum(limit for _, limit, _ in run) <= 560  # the device tool allows 600 s a command, pip install included


def test_gpu_check_stops_a_hung_step_and_keeps_its_output():
    check, lines = load_script("gpu_check"), []
    # a child that sleeps holding the output open, as torchrun's ranks under pytest would
    hung = ("import subprocess, sys; print('started', flush=True); "
            "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])")
    t0 = time.perf_counter()
    code = check.run_step([sys.executable, "-c", hung], 1.0, lines.append)
    assert code < 0 and lines == ["started"] and time.perf_counter() - t0 < 30  # killed after 1 s, child too
    assert check.run_step([sys.executable, "-c", "print('done')"], 30, lines.append) == 0 and lines[-1] == "done"


def test_gpu_check_without_a_gpu_says_so():
    run = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")],
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "sees no CUDA GPU" in run.stdout, run.stdout + run.stderr


def test_dedup_speed_times_and_saves_its_table(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "dedup_speed.py"), "--n", "300", "--thresholds", "0.5", "0.8",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "dedup_speed.json").read_text())["rows"]
    dedup_speed = load_script("dedup_speed")
    from minipeft.data.dedup import near_duplicate_pairs
    expected = [str(len(near_duplicate_pairs(dedup_speed.texts(300), t))) for t in (0.5, 0.8)]
    assert [r["pairs"] for r in rows] == expected and "| working tree | 0.5 |" in (tmp_path / "dedup_speed.md").read_text()

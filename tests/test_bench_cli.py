"""`fedsilo bench --json`: the interface IT scripts and our perf notes rely on."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_json_reports_bandwidth_and_every_kernel_beside_numpy():
    run = subprocess.run([sys.executable, "-m", "agent", "bench", "--json", "--parameters",
                          "200000", "--sites", "3", "--repeats", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(run.stdout)
    assert doc["memory_bandwidth_gbps"] > 0
    by_name = {b["name"]: b for b in doc["benchmarks"]}
    assert {"aggregate_int8", "aggregate_float32", "quantize_int8", "topk_1pct"} <= set(by_name)
    for b in doc["benchmarks"]:
        assert b["unit"] == "GB/s" and b["value"] > 0 and b["baseline"] > 0
        assert abs(b["speedup"] - b["value"] / b["baseline"]) < 0.01 * b["speedup"] + 0.01
    agg = by_name["aggregate_int8"]
    # (the fraction is computed before the printed figures are rounded to 3 decimals)
    fraction = agg["value"] / doc["memory_bandwidth_gbps"]
    assert 0 < agg["fraction_of_bandwidth"]
    assert abs(agg["fraction_of_bandwidth"] - fraction) < 0.01 * fraction + 0.001
    assert "fraction_of_bandwidth" not in by_name["topk_1pct"]
    assert "[1/5]" in run.stderr  # progress


def test_bench_refuses_bad_arguments_with_exit_2():
    run = subprocess.run([sys.executable, "-m", "agent", "bench", "--sites", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--sites" in run.stderr
    run = subprocess.run([sys.executable, "-m", "agent", "bench", "--backend", "gpu2"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "gpu2" in run.stderr and "Traceback" not in run.stderr

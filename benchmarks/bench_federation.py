"""Federation benchmark: round overhead, site peak memory, start-up to first training step.

Runs real federations (embedded Mosquitto, the coordinator in this process, each site its own
`fedsilo site run` process) on the demo cohorts and prints, for several repeats, the figures
issue 2 sets targets for, each next to its baseline measured in the same run:

- round overhead = a round's wall time minus the slowest site's local training time
  (baseline: the slowest site's training time itself, the part federation cannot remove);
- site peak RSS (VmHWM of each site process, as it reports in its log at exit)
  (baseline: a bare Python interpreter that imports numpy, measured here);
- process start to first local training step with a warm Numba cache
  (baseline: the same with an empty cache, i.e. a cold JIT).

Usage: python benchmarks/bench_federation.py [--repeats 5] [--rounds 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.demo.run import coordinator_for, prepare_demo, start_sites, wait_sites
from agent.federation.broker import LocalMosquitto

RSS_LINE = re.compile(r"peak RSS ([0-9.]+) MiB")
PRIVATE_LINE = re.compile(r"now ([0-9.]+) MiB private, ([0-9.]+) MiB file-backed")
FIRST_STEP = re.compile(r"first training step [0-9.]+ s after the task arrived \(([0-9.]+) s after "
                        r"process start\)")


def _from_logs(out: Path, names: list[str], pattern: re.Pattern[str]) -> dict[str, float]:
    found = {}
    for name in names:
        m = pattern.search((out / "sites" / name / "site.log").read_text())
        if m:
            found[name] = float(m.group(1))
    return found


def federation_once(work: Path, rounds: int, seed: int) -> dict:
    files = prepare_demo(work, sites=3, rounds=rounds, seed=seed, verbose=False)
    names = [p.name for p in files.profiles]
    with LocalMosquitto(files.out / "broker") as broker:
        procs = start_sites(files, broker.port)
        coordinator = coordinator_for(files, broker.port)
        try:
            coordinator.run()
        finally:
            wait_sites(procs)
    rounds_ = [h for h in coordinator.history if "round" in h and "final" not in h]
    return {
        "overhead_s": statistics.median(r["overhead_s"] for r in rounds_),
        "slowest_train_s": statistics.median(r["slowest_train_s"] for r in rounds_),
        "round_s": statistics.median(r["seconds"] for r in rounds_),
        "site_peak_rss_mib": _from_logs(files.out, names, RSS_LINE),
        "site_private_mib_at_exit": _from_logs(files.out, names, PRIVATE_LINE),
    }


def first_step_once(work: Path, seed: int, cache_dir: str | None) -> float:
    """One site, the coordinator already waiting: process start -> first optimizer step."""
    files = prepare_demo(work, sites=1, rounds=1, seed=seed, verbose=False)
    name = files.profiles[0].name
    with LocalMosquitto(files.out / "broker") as broker:
        coordinator = coordinator_for(files, broker.port)
        import threading

        t = threading.Thread(target=coordinator.run, daemon=True)
        t.start()
        time.sleep(0.5)  # the coordinator's task is retained and waiting
        env_backup = os.environ.get("NUMBA_CACHE_DIR")
        if cache_dir is not None:
            os.environ["NUMBA_CACHE_DIR"] = cache_dir
        try:
            procs = start_sites(files, broker.port)
        finally:
            if cache_dir is not None:
                if env_backup is None:
                    del os.environ["NUMBA_CACHE_DIR"]
                else:
                    os.environ["NUMBA_CACHE_DIR"] = env_backup
        t.join(120)
        wait_sites(procs)
    return _from_logs(files.out, [name], FIRST_STEP)[name]


def bare_python_rss_mib() -> float:
    code = ("import numpy; from agent.federation.site import peak_rss_mib; "
            "print(peak_rss_mib())")
    return float(subprocess.check_output([sys.executable, "-c", code], text=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict = {"federations": [], "first_step_warm_s": [], "first_step_cold_s": []}
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as tmp:
        tmp_path = Path(tmp)
        for i in range(args.repeats):
            print(f"[{i + 1}/{args.repeats}] federation: 3 sites x {args.rounds} rounds ...",
                  end="", flush=True)
            r = federation_once(tmp_path / f"fed{i}", args.rounds, seed=i)
            results["federations"].append(r)
            print(f" overhead {r['overhead_s'] * 1000:.1f} ms, peak site RSS "
                  f"{max(r['site_peak_rss_mib'].values()):.0f} MiB", flush=True)
        for i in range(args.repeats):
            print(f"[{i + 1}/{args.repeats}] start-up: warm cache, then cold cache ...", end="",
                  flush=True)
            warm = first_step_once(tmp_path / f"warm{i}", seed=i, cache_dir=None)
            cold = first_step_once(tmp_path / f"cold{i}", seed=i,
                                   cache_dir=tempfile.mkdtemp(dir=tmp))
            results["first_step_warm_s"].append(warm)
            results["first_step_cold_s"].append(cold)
            print(f" warm {warm:.2f} s, cold {cold:.2f} s", flush=True)
    results["bare_python_numpy_rss_mib"] = bare_python_rss_mib()

    feds = results["federations"]
    overhead = statistics.median(f["overhead_s"] for f in feds)
    train = statistics.median(f["slowest_train_s"] for f in feds)
    rss = [max(f["site_peak_rss_mib"].values()) for f in feds]
    private = [max(f["site_private_mib_at_exit"].values()) for f in feds]
    warm = statistics.median(results["first_step_warm_s"])
    cold = statistics.median(results["first_step_cold_s"])
    print()
    print(f"{'figure (median of ' + str(args.repeats) + ' runs)':<44}{'value':>12}"
          f"{'baseline':>14}  target")
    print(f"{'round overhead, 3 sites, logistic':<44}{overhead * 1000:>9.1f} ms"
          f"{train * 1000:>11.1f} ms  <= 50 ms   (baseline: slowest site's training)")
    print(f"{'site peak RSS (max over sites)':<44}{statistics.median(rss):>8.0f} MiB"
          f"{results['bare_python_numpy_rss_mib']:>10.0f} MiB  <= 150 MiB  "
          "(baseline: python + numpy)")
    print(f"{'  of which private (anonymous) at exit':<44}{statistics.median(private):>8.0f} MiB"
          "               (the rest is shared library code)")
    print(f"{'process start -> first training step, warm':<44}{warm:>10.2f} s"
          f"{cold:>12.2f} s  <= 3 s      (baseline: cold Numba cache)")
    results["summary"] = {"round_overhead_ms": overhead * 1000, "slowest_train_ms": train * 1000,
                          "site_peak_rss_mib": statistics.median(rss),
                          "site_private_mib_at_exit": statistics.median(private),
                          "first_step_warm_s": warm, "first_step_cold_s": cold}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Coordinator peak memory against the number of sites, for a ~1 M-parameter model.

Runs the demo cohorts with an MLP of about 1 M parameters for a few rounds, once with 3 and
once with 30 sites (each a `fedsilo site run` process, embedded Mosquitto), the coordinator as
its own `fedsilo coordinator run` process whose peak resident memory (VmHWM) is read from
/proc while it runs. Issue 4's target: peak(30 sites) / peak(3 sites) <= 1.3 — memory should
grow with the model, not with sites x model.

Usage: python benchmarks/bench_coordinator_memory.py [--rounds 2] [--codec int8|none]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.config import CompressionSpec, ModelSpec
from agent.demo.run import coordinator_for, prepare_demo, start_sites, wait_sites
from agent.federation.broker import LocalMosquitto

MODEL = ModelSpec(kind="mlp", hidden=(1000, 1000))  # 14 x 1000 + 1000 x 1000 + ...: ~1.0 M


def _peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(work: Path, sites: int, rounds: int, spec: CompressionSpec) -> dict[str, float]:
    files = prepare_demo(work, sites=sites, rounds=rounds, seed=0, verbose=False, model=MODEL,
                         compression=spec)
    with LocalMosquitto(files.out / "broker") as broker:
        coordinator_for(files, broker.port)  # writes coordinator.toml, clears old state
        procs = start_sites(files, broker.port)
        t = time.monotonic()
        coord = subprocess.Popen(
            [sys.executable, "-m", "agent", "coordinator", "run", "--config",
             str(files.out / "coordinator.toml"), "--plan", str(files.out / "plan.toml")],
            stdout=subprocess.DEVNULL, stderr=open(files.out / "coordinator.log", "wb"))
        peak = [0]

        def watch() -> None:
            while coord.poll() is None:
                peak[0] = max(peak[0], _peak_kib(coord.pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            rc = coord.wait(timeout=1800)
        finally:
            watcher.join(5)
            wait_sites(procs, timeout_s=60)
        if rc != 0:
            raise SystemExit(f"coordinator exited with {rc}; see {files.out / 'coordinator.log'}")
    return {"peak_mib": peak[0] / 1024, "seconds": time.monotonic() - t}


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--codec", choices=("int8", "none"), default="int8")
    args = ap.parse_args()
    spec = CompressionSpec(quantize=args.codec)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-coord-") as tmp:
        for n in (3, 30):
            print(f"{n} sites, {args.rounds} rounds, MLP {list(MODEL.hidden)}, "
                  f"updates {args.codec} ...", flush=True)
            results[n] = run(Path(tmp) / f"s{n}", n, args.rounds, spec)
            print(f"  coordinator peak RSS {results[n]['peak_mib']:.0f} MiB "
                  f"({results[n]['seconds']:.0f} s)", flush=True)
    ratio = results[30]["peak_mib"] / results[3]["peak_mib"]
    print(f"\ncoordinator peak RSS, 30 sites / 3 sites: {ratio:.2f} (target <= 1.3)")


main()

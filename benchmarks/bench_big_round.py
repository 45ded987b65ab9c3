"""One federated round with a ~10 M-parameter model and 10 sites over a local Mosquitto.

Each site is a `fedsilo site run` process on the demo cohorts training an MLP of about 10 M
parameters; every body travels in <= 1 MiB chunks. Prints seconds per round, MB on the wire
(task down to each site, updates up), the share of the round spent outside training (the
round's wall time minus the slowest site's training time), and peak resident memory of the
coordinator (this process) and of the largest site, beside the model's float32 size: bounded
memory on both ends means a small multiple of the model, not of the bodies in flight. Issue 4
asks for the round to complete and for these figures.

Usage: python benchmarks/bench_big_round.py [--sites 10] [--rounds 1] [--codec int8|none]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from agent.config import CompressionSpec, ModelSpec
from agent.demo.run import coordinator_for, prepare_demo, start_sites, wait_sites
from agent.federation.broker import LocalMosquitto

MODEL = ModelSpec(kind="mlp", hidden=(3150, 3150))  # 14 x 3150 + 3150 x 3150 + ...: ~10.0 M


def peak_mib(pid: int | str = "self") -> float:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--codec", choices=("int8", "none"), default="int8")
    args = ap.parse_args()
    logging.getLogger("agent").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-big-") as tmp:
        files = prepare_demo(Path(tmp), sites=args.sites, rounds=args.rounds, seed=0,
                             verbose=False, model=MODEL,
                             compression=CompressionSpec(quantize=args.codec))
        with LocalMosquitto(files.out / "broker") as broker:
            print(f"{args.sites} sites, MLP {list(MODEL.hidden)}, updates {args.codec}, "
                  f"{args.rounds} round(s) ...", flush=True)
            procs = start_sites(files, broker.port)
            coordinator = coordinator_for(
                files, broker.port,
                on_round=lambda r: print(f"  round {r['round']}: {r['seconds']:.1f} s", flush=True))
            site_peak = 0.0
            try:
                coordinator.run()
                site_peak = max(peak_mib(p.pid) for _, p in procs)  # before they exit
            finally:
                wait_sites(procs, timeout_s=120)
        rounds = [h for h in coordinator.history if "round" in h and "final" not in h]
    params = coordinator.layout.size
    print(f"\nmodel: {params:,} parameters ({params * 4 / 1e6:.1f} MB as float32)")
    for r in rounds:
        up = [s["bytes_up"] for s in r["per_site"].values()]
        down = statistics.median(s["bytes_down"] for s in r["per_site"].values())
        print(f"round {r['round']}: {r['seconds']:.1f} s; on the wire {down / 1e6:.1f} MB down "
              f"to each site (task, once to the broker), {sum(up) / 1e6:.1f} MB up in all "
              f"({statistics.median(up) / 1e6:.2f} MB a site); slowest training "
              f"{r['slowest_train_s']:.1f} s, outside training {r['overhead_s']:.1f} s "
              f"= {100 * r['overhead_s'] / r['seconds']:.0f} % of the round")
    print(f"peak RSS: coordinator {peak_mib():.0f} MiB, largest site {site_peak:.0f} MiB "
          f"(model {params * 4 / 2**20:.0f} MiB as float32)")


main()

"""Update compression on the demo task: bytes a site uploads per round, and what it costs.

Runs the demo federation (`fedsilo demo`'s task: 3 generated hospitals, its MLP, embedded
Mosquitto, one process per site) once per codec setting with the same cohorts, seed and
rounds, and prints for each the median bytes a site uploads per round, the factor against
raw float32, and the federated AUC on the common test set beside the uncompressed run's.
Issue 4's targets: int8 + top-k >= 16x fewer bytes with AUC within 0.005 of uncompressed;
int8 alone >= 3.9x.

Usage: python benchmarks/bench_compression.py [--rounds 15] [--hidden 32] [--topk 0.05]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from agent.config import CompressionSpec, ModelSpec
from agent.demo.run import (
    DEMO_COMPRESSION,
    DEMO_MODEL,
    coordinator_for,
    prepare_demo,
    start_sites,
    wait_sites,
)
from agent.federation.broker import LocalMosquitto


def run(out: Path, rounds: int, model: ModelSpec, spec: CompressionSpec) -> dict[str, float]:
    from agent.demo.run import _score  # the demo's own scoring (federated vs baselines)

    files = prepare_demo(out, sites=3, rounds=rounds, seed=0, verbose=False, model=model,
                         compression=spec)
    with LocalMosquitto(files.out / "broker") as broker:
        procs = start_sites(files, broker.port)
        coordinator = coordinator_for(files, broker.port)
        try:
            final = coordinator.run()
        finally:
            wait_sites(procs)
    summary = _score(files, coordinator, final)
    ups = list(summary["bytes_up_per_round"].values())
    return {"auc": summary["federated_auc"], "bytes": statistics.median(ups),
            "raw": summary["compression"]["raw_bytes"]}


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=DEMO_MODEL.hidden[0],
                    help="MLP hidden width (0: logistic); default: the demo's")
    ap.add_argument("--topk", type=float, default=DEMO_COMPRESSION.topk_fraction)
    ap.add_argument("--block", type=int, default=DEMO_COMPRESSION.block)
    args = ap.parse_args()
    logging.getLogger("agent").setLevel(logging.ERROR)
    model = ModelSpec("mlp", hidden=(args.hidden,)) if args.hidden else ModelSpec("logistic")
    settings = [("float32 (none)", CompressionSpec()),
                ("int8", CompressionSpec(quantize="int8", block=args.block)),
                (f"int8 + top {args.topk:g}", CompressionSpec(
                    quantize="int8", topk_fraction=args.topk, block=args.block))]
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-compression-") as tmp:
        for i, (name, spec) in enumerate(settings, 1):
            print(f"[{i}/{len(settings)}] demo federation, {args.rounds} rounds, {name} ...",
                  flush=True)
            results[name] = run(Path(tmp) / f"run{i}", args.rounds, model, spec)
    base = results["float32 (none)"]
    print(f"\nmodel {model.kind} {list(model.hidden)}: {base['raw']} bytes of float32 "
          "parameters per update")
    for name, r in results.items():
        print(f"  {name:<16} {r['bytes']:8.0f} bytes up per site and round = "
              f"{r['raw'] / r['bytes']:5.1f}x fewer than float32;  AUC {r['auc']:.4f} "
              f"({r['auc'] - base['auc']:+.4f})")
    print("targets: int8 + top-k >= 16x with AUC within 0.005; int8 alone >= 3.9x")


main()

"""Aggregation through the coordinator's real path: 10 sites x 10 M parameters, int8 updates
decoded and folded in 1 MiB pieces (as chunks arrive), then applied.

Runs unchanged against a checkout from before the strategy seam (it uses only
`FedAvgAccumulator.open_update/apply`, which both have), so the same command on both commits
compares them: `PYTHONPATH=<checkout> python benchmarks/bench_seam.py`. Prints the median of
several rounds as seconds per round and parameters per second (every site's parameters).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import kernels
from agent.config import CompressionSpec
from agent.federation.aggregate import FedAvgAccumulator
from agent.federation.codec import encode_update

PIECE = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quantize", default="int8", choices=("int8", "none"))
    args = ap.parse_args()
    k = kernels.get_backend("cpu")
    spec = CompressionSpec(quantize=args.quantize)
    rng = np.random.default_rng(0)
    print(f"encoding {args.sites} updates of {args.params:,} parameters ({args.quantize}) ...",
          file=sys.stderr, flush=True)
    encoded = []
    for s in range(args.sites):
        d = (rng.standard_normal(args.params) * 0.01).astype(np.float32)
        encoded.append(encode_update(d, spec, seed=s, kernels=k, residual=np.zeros_like(d)))
    params = np.zeros(args.params, dtype=np.float32)

    def one_round() -> float:
        t = time.perf_counter()
        acc = FedAvgAccumulator(args.params, k)
        streams = [acc.open_update(e.meta, 100.0 + s, spec, label=f"s{s}",
                                   body_len=len(e.body)) for s, e in enumerate(encoded)]
        longest = max(len(e.body) for e in encoded)
        for a in range(0, longest, PIECE):  # the sites' chunks interleave, as on the wire
            for stream, e in zip(streams, encoded, strict=True):
                if a < len(e.body):
                    stream.feed(e.body[a:a + PIECE])
        for stream in streams:
            stream.finish()
        acc.apply(params)
        return time.perf_counter() - t

    one_round()  # JIT and page-in
    times = []
    for i in range(args.repeats):
        times.append(one_round())
        print(f"[{i + 1}/{args.repeats}] round {times[-1]:.3f} s", file=sys.stderr, flush=True)
    med = statistics.median(times)
    print(f"aggregate {args.sites} sites x {args.params:,} ({args.quantize}) through the "
          f"coordinator's path: {med:.3f} s a round (median of {args.repeats}), "
          f"{args.sites * args.params / med / 1e9:.2f} G parameters/s")


if __name__ == "__main__":
    main()

"""Robust aggregation kernels (issue 12) against numpy on the same round: GB/s and ratios.

One round of `--sites` updates of `--params` float32 parameters (default 10 x 10 M = 400 MB,
held once as a [sites, params] matrix, as the coordinator must for these rules). For each
statistic, the kernel backend's time and the plain-numpy way's, medians of several runs in
this process, as GB/s of the matrix read once:
  median        kernel coordinate_median   vs np.median(u, axis=0)
  trimmed mean  kernel trimmed_mean(u, t)  vs np.sort(u, axis=0)[t:k-t].mean(axis=0)
  distances     kernel pairwise_sq_distances vs a float64 dot of each pair's difference
  norms         kernel l2_norms            vs np.linalg.norm of each row in float64
Target (issue 12): median and trimmed mean >= 5x numpy. With --backend gpu the matrix lives on
the device and the baselines are the same expressions in CuPy there.

Usage: python benchmarks/bench_robust.py [--sites 10] [--params 10000000] [--trim 1]
       [--repeats 5] [--backend cpu]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

import kernels
from agent.ops.bench import Place, _median_seconds, place_of, triad_gbps
from kernels import ref_robust


def make_round(place: Place, sites: int, params: int) -> object:
    """Seeded [sites, params] float32 updates, each site at its own scale; one copy."""
    u = place.xp.empty((sites, params), dtype=place.xp.float32)
    scales = np.random.default_rng(0).uniform(0.005, 0.02, sites)
    for s in range(sites):
        u[s] = place.normal(s, params, float(scales[s]))
    return u


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--trim", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    args = ap.parse_args()
    k = kernels.get_backend(args.backend)
    place = place_of(args.backend)
    xp, t, sites = place.xp, args.trim, args.sites
    ref_robust.check_trim(t, sites)
    slow = max(1, args.repeats // 2)

    print(f"[1/6] {sites} x {args.params:,} float32 updates "
          f"({sites * args.params * 4 / 1e6:.0f} MB) ...", flush=True)
    u = make_round(place, sites, args.params)
    nbytes = sites * args.params * 4
    bandwidth = None if place.on_device else triad_gbps(args.params, args.repeats)

    def pairs() -> object:  # a pair at a time: float64 temporaries of one row, not the matrix
        d2 = xp.zeros((sites, sites))
        for i in range(sites):
            for j in range(i + 1, sites):
                diff = u[i].astype(xp.float64) - u[j].astype(xp.float64)
                d2[i, j] = xp.dot(diff, diff)
        return d2

    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("median", lambda: k.coordinate_median(u), lambda: xp.median(u, axis=0)),
        (f"trimmed mean (trim {t})", lambda: k.trimmed_mean(u, t),
         lambda: xp.sort(u, axis=0)[t:sites - t].mean(axis=0)),
        ("pairwise sq distances", lambda: k.pairwise_sq_distances(u),
         pairs),
        ("l2 norms", lambda: k.l2_norms(u),
         lambda: [float(xp.linalg.norm(row.astype(xp.float64))) for row in u]),
    ]
    print("[2/6] checking the kernel median equals numpy's ...", flush=True)
    if not bool((k.coordinate_median(u) == xp.median(u, axis=0)).all()):
        raise SystemExit("kernel median differs from numpy's: not benchmarking a wrong kernel")
    rows = []
    for i, (name, fast, base) in enumerate(cases, 3):
        print(f"[{i}/6] {name}: kernel x{args.repeats}, numpy x{slow} ...", flush=True)
        t_fast = _median_seconds(fast, args.repeats, place)
        t_base = _median_seconds(base, slow, place)
        rows.append((name, nbytes / t_fast / 1e9, nbytes / t_base / 1e9, t_base / t_fast))
    where = k.__name__.split(".")[-1]
    print(f"\n{sites} sites x {args.params:,} parameters, backend {where}, GB/s of the "
          "float32 matrix read once, medians" + (f"; triad bandwidth {bandwidth:.1f} GB/s"
                                                  if bandwidth else ""))
    print(f"{'statistic':<26}{'kernel GB/s':>12}{'numpy GB/s':>12}{'ratio':>8}")
    for name, fast, base, ratio in rows:
        print(f"{name:<26}{fast:12.2f}{base:12.2f}{ratio:7.1f}x")
    print("target: median and trimmed mean >= 5x numpy")


main()

"""`fedsilo bench`: how fast this host runs the kernels a federation leans on.

Measures the host's memory bandwidth with a STREAM-style triad (a = b + s * c, float32, all
cores), then each kernel's throughput in GB/s of the bytes it must move, as a fraction of that
bandwidth, beside the plain-numpy way of doing the same work measured in the same run. Medians
of several runs: these machines are noisy. Hospital IT can run it on a site or coordinator
host to check it; we use it for the figures in docs/perf.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TextIO

import numpy as np
from numba import njit, prange

import kernels
from kernels import ref_codec

BLOCK = 256


@njit(cache=True, parallel=True)
def _triad(a, b, c, s):  # pragma: no cover - compiled
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@dataclass(frozen=True)
class Result:
    name: str
    value: float  # GB/s
    baseline: float  # GB/s, the numpy way, same bytes counted
    memory_bound: bool = True

    def as_dict(self, bandwidth: float) -> dict[str, Any]:
        doc = {"name": self.name, "value": round(self.value, 3), "unit": "GB/s",
               "baseline": round(self.baseline, 3),
               "speedup": round(self.value / self.baseline, 2) if self.baseline else None}
        if self.memory_bound:
            doc["fraction_of_bandwidth"] = round(self.value / bandwidth, 3)
        return doc


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: JIT cache, page faults of fresh outputs
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def triad_gbps(n: int, repeats: int) -> float:
    a, b, c = (np.full(n, v, dtype=np.float32) for v in (0.0, 1.0, 2.0))
    return 12 * n / _median_seconds(lambda: _triad(a, b, c, np.float32(3.0)), repeats) / 1e9


def _aggregate_int8(k: ModuleType, n: int, sites: int, repeats: int) -> Result:
    """FedAvg over `sites` int8 updates: read codes (1 B) + accumulator (4 B), write it (4 B)
    per parameter and site."""
    rng = np.random.default_rng(0)
    updates = [k.quantize_int8((rng.standard_normal(n) * 0.01).astype(np.float32), BLOCK, s)
               for s in range(sites)]
    acc = np.zeros(n, dtype=np.float32)
    weights = [float(w) for w in rng.uniform(50, 500, sites)]

    def fused() -> None:
        for (q, s), w in zip(updates, weights, strict=True):
            k.dequantize_accumulate(acc, q, s, BLOCK, w)

    def numpy_way() -> None:
        for (q, s), w in zip(updates, weights, strict=True):
            update = q.astype(np.float32) * np.repeat(s, BLOCK)[:n]  # dequantize
            np.add(acc, np.float32(w) * update, out=acc)  # then accumulate

    nbytes = sites * (9 * n + 4 * updates[0][1].size)
    return Result("aggregate_int8", nbytes / _median_seconds(fused, repeats) / 1e9,
                  nbytes / _median_seconds(numpy_way, max(1, repeats // 2)) / 1e9)


def _quantize_int8(k: ModuleType, n: int, repeats: int) -> Result:
    x = (np.random.default_rng(1).standard_normal(n) * 0.01).astype(np.float32)
    nbytes = 5 * n  # read float32, write int8 (scales are 1/256 of that)
    return Result("quantize_int8",
                  nbytes / _median_seconds(lambda: k.quantize_int8(x, BLOCK, 7), repeats) / 1e9,
                  nbytes / _median_seconds(lambda: ref_codec.quantize_int8(x, BLOCK, 7),
                                           max(1, repeats // 2)) / 1e9)


def _weighted_accumulate(k: ModuleType, n: int, repeats: int) -> Result:
    x = np.ones(n, dtype=np.float32)
    acc = np.zeros(n, dtype=np.float32)

    def numpy_way() -> None:
        acc[:] += np.float32(0.5) * x

    nbytes = 12 * n
    return Result("aggregate_float32",
                  nbytes / _median_seconds(lambda: k.weighted_accumulate(acc, x, 0.5),
                                           repeats) / 1e9,
                  nbytes / _median_seconds(numpy_way, repeats) / 1e9)


def _topk(k: ModuleType, n: int, repeats: int) -> Result:
    v = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    kk = max(1, n // 100)
    nbytes = 4 * n
    return Result("topk_1pct",
                  nbytes / _median_seconds(lambda: k.topk_indices(v, kk), repeats) / 1e9,
                  nbytes / _median_seconds(lambda: ref_codec.topk_indices(v, kk),
                                           repeats) / 1e9, memory_bound=False)


def run_bench(*, n: int = 10_000_000, sites: int = 10, repeats: int = 5,
              backend: str = "auto", progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """The JSON document `fedsilo bench --json` prints."""
    k = kernels.get_backend(backend)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("memory bandwidth (triad)", lambda: triad_gbps(n, repeats)),
        (f"aggregate_int8 ({sites} sites x {n:,} parameters)",
         lambda: _aggregate_int8(k, n, sites, repeats)),
        ("aggregate_float32", lambda: _weighted_accumulate(k, n, repeats)),
        ("quantize_int8", lambda: _quantize_int8(k, n, repeats)),
        ("topk_1pct", lambda: _topk(k, n, repeats)),
    ]
    out: list[Any] = []
    for i, (label, step) in enumerate(steps, 1):
        if progress is not None:
            progress.write(f"[{i}/{len(steps)}] {label} ...\n")
            progress.flush()
        out.append(step())
    bandwidth = out[0]
    return {"memory_bandwidth_gbps": round(bandwidth, 3), "backend": k.__name__.split(".")[-1],
            "parameters": n, "sites": sites, "repeats": repeats,
            "benchmarks": [r.as_dict(bandwidth) for r in out[1:]]}


def format_report(doc: dict[str, Any]) -> str:
    lines = [f"memory bandwidth (STREAM triad, all cores): {doc['memory_bandwidth_gbps']:.1f} GB/s",
             f"{'kernel':<20}{'GB/s':>8}{'of bandwidth':>14}{'numpy GB/s':>12}{'speedup':>9}"]
    for b in doc["benchmarks"]:
        frac = b.get("fraction_of_bandwidth")
        lines.append(f"{b['name']:<20}{b['value']:8.2f}"
                     f"{'' if frac is None else f'{100 * frac:.0f} %':>14}"
                     f"{b['baseline']:12.2f}{b['speedup']:8.1f}x")
    return "\n".join(lines)

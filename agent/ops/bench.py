"""`fedsilo bench`: how fast this host runs the kernels a federation leans on.

Measures the host's memory bandwidth with a STREAM-style triad (a = b + s * c, float32, all
cores), then each kernel's throughput in GB/s of the bytes it must move, as a fraction of that
bandwidth, beside the plain-numpy way of doing the same work measured in the same run. Medians
of several runs: these machines are noisy. Hospital IT can run it on a site or coordinator
host to check it; we use it for the figures in docs/perf.md. With `--backend gpu` the same
figures are taken on the CUDA device (see `run_bench`).
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


@dataclass(frozen=True)
class Place:
    """Where a backend's arrays live and how to wait for work queued on them: host memory
    for numpy/Numba; device memory for the gpu backend, whose kernels return before they
    finish, so each timing waits for the device."""

    xp: ModuleType
    sync: Callable[[], None]
    on_device: bool = False

    def put(self, a: np.ndarray) -> Any:
        return self.xp.asarray(a)

    def normal(self, seed: int, n: int, scale: float = 1.0) -> Any:
        """Seeded float32 normals made where they are used (100 M on the host take seconds)."""
        if self.on_device:
            return self.xp.random.RandomState(seed).standard_normal(
                n, dtype=self.xp.float32) * self.xp.float32(scale)
        return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


HOST = Place(np, lambda: None)


def place_of(backend: str) -> Place:
    if backend != "gpu":
        return HOST
    import cupy

    return Place(cupy, cupy.cuda.Device().synchronize, on_device=True)


def _median_seconds(fn: Callable[[], object], repeats: int, place: Place = HOST) -> float:
    fn()  # warm: JIT cache, kernel compilation, page faults of fresh outputs
    place.sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        place.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def triad_gbps(n: int, repeats: int) -> float:
    a, b, c = (np.full(n, v, dtype=np.float32) for v in (0.0, 1.0, 2.0))
    return 12 * n / _median_seconds(lambda: _triad(a, b, c, np.float32(3.0)), repeats) / 1e9


def device_copy_gbps(place: Place, n: int, repeats: int) -> float:
    """The device's copy bandwidth, counting bytes read plus bytes written (the yardstick the
    GPU targets use); 1 GiB buffers, far beyond any cache."""
    src = place.xp.ones(n, dtype=place.xp.float32)
    dst = place.xp.empty_like(src)
    return 8 * n / _median_seconds(lambda: place.xp.copyto(dst, src), repeats, place) / 1e9


def _aggregate_int8(k: ModuleType, place: Place, n: int, sites: int,
                    repeats: int) -> list[Result]:
    """FedAvg over `sites` int8 updates, as the coordinator sums sites uploading together:
    one pass over the sum for all of them (1 byte of code per site, 4 + 4 for the sum per
    parameter). Also the one-site-at-a-time kernel (9 bytes per parameter and site), and the
    numpy way (dequantize, then accumulate, site by site), credited with the same bytes."""
    xp = place.xp
    updates = [k.quantize_int8(place.normal(s, n, 0.01), BLOCK, s) for s in range(sites)]
    q = xp.stack([u[0] for u in updates])
    scales = xp.stack([u[1] for u in updates])
    acc = xp.zeros(n, dtype=xp.float32)
    weights = np.random.default_rng(0).uniform(50, 500, sites).astype(np.float32)
    w_placed = place.put(weights)

    def one_pass() -> None:
        k.dequantize_accumulate_many(acc, q, scales, BLOCK, w_placed)

    def per_site() -> None:
        for s in range(sites):
            k.dequantize_accumulate(acc, q[s], scales[s], BLOCK, float(weights[s]))

    def array_way() -> None:
        for s in range(sites):
            update = q[s].astype(xp.float32) * xp.repeat(scales[s], BLOCK)[:n]  # dequantize
            xp.add(acc, xp.float32(weights[s]) * update, out=acc)  # then accumulate

    codes = sites * (n + 4 * scales.shape[1])
    t_array = _median_seconds(array_way, max(1, repeats // 2), place)
    fused = codes + 8 * n
    per = codes + sites * 8 * n
    return [Result("aggregate_int8", fused / _median_seconds(one_pass, repeats, place) / 1e9,
                   fused / t_array / 1e9),
            Result("aggregate_int8_per_site",
                   per / _median_seconds(per_site, repeats, place) / 1e9, per / t_array / 1e9)]


def _quantize_int8(k: ModuleType, place: Place, n: int, repeats: int) -> Result:
    host = (np.random.default_rng(1).standard_normal(n) * 0.01).astype(np.float32)
    x = place.put(host)
    nbytes = 5 * n  # read float32, write int8 (scales are 1/256 of that)
    return Result("quantize_int8",
                  nbytes / _median_seconds(lambda: k.quantize_int8(x, BLOCK, 7), repeats,
                                           place) / 1e9,
                  nbytes / _median_seconds(lambda: ref_codec.quantize_int8(host, BLOCK, 7),
                                           max(1, repeats // 2)) / 1e9)


def _weighted_accumulate(k: ModuleType, place: Place, n: int, repeats: int) -> Result:
    xp = place.xp
    x = xp.ones(n, dtype=xp.float32)
    acc = xp.zeros(n, dtype=xp.float32)

    def array_way() -> None:
        acc[:] += xp.float32(0.5) * x

    nbytes = 12 * n
    return Result("aggregate_float32",
                  nbytes / _median_seconds(lambda: k.weighted_accumulate(acc, x, 0.5),
                                           repeats, place) / 1e9,
                  nbytes / _median_seconds(array_way, repeats, place) / 1e9)


def _topk(k: ModuleType, place: Place, n: int, repeats: int) -> Result:
    host = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    v = place.put(host)
    kk = max(1, n // 100)
    nbytes = 4 * n
    return Result("topk_1pct",
                  nbytes / _median_seconds(lambda: k.topk_indices(v, kk), repeats, place) / 1e9,
                  nbytes / _median_seconds(lambda: ref_codec.topk_indices(host, kk),
                                           repeats) / 1e9, memory_bound=False)


def run_bench(*, n: int = 10_000_000, sites: int = 10, repeats: int = 5,
              backend: str = "auto", progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """The JSON document `fedsilo bench --json` prints.

    On the gpu backend the arrays live on the device, the yardstick is the device's copy
    bandwidth, and the aggregation baselines are the same array expressions run by CuPy on the
    same device (quantize and top-k baselines stay the numpy oracle on the host)."""
    k = kernels.get_backend(backend)
    name = k.__name__.split(".")[-1]
    place = place_of(name)
    if place.on_device:
        yardstick = ("memory bandwidth (device copy, 1 GiB)",
                     lambda: device_copy_gbps(place, 1 << 28, repeats))
    else:
        yardstick = ("memory bandwidth (triad)", lambda: triad_gbps(n, repeats))
    steps: list[tuple[str, Callable[[], Any]]] = [
        yardstick,
        (f"aggregate_int8 ({sites} sites x {n:,} parameters)",
         lambda: _aggregate_int8(k, place, n, sites, repeats)),
        ("aggregate_float32", lambda: _weighted_accumulate(k, place, n, repeats)),
        ("quantize_int8", lambda: _quantize_int8(k, place, n, repeats)),
        ("topk_1pct", lambda: _topk(k, place, n, repeats)),
    ]
    out: list[Any] = []
    for i, (label, step) in enumerate(steps, 1):
        if progress is not None:
            progress.write(f"[{i}/{len(steps)}] {label} ...\n")
            progress.flush()
        result = step()
        out.extend(result if isinstance(result, list) else [result])
    bandwidth = out[0]
    doc = {"memory_bandwidth_gbps": round(bandwidth, 3), "backend": name,
           "bandwidth_measure": "device copy" if place.on_device else "triad",
           "parameters": n, "sites": sites, "repeats": repeats,
           "benchmarks": [r.as_dict(bandwidth) for r in out[1:]]}
    if place.on_device:
        doc["device"] = place.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        doc["baselines"] = ("aggregate_*: the same array expressions in CuPy on the device; "
                            "quantize_int8, topk_1pct: the numpy oracle on the host")
    return doc


def format_report(doc: dict[str, Any]) -> str:
    measure = ("device copy, read + write" if doc.get("bandwidth_measure") == "device copy"
               else "STREAM triad, all cores")
    lines = [f"memory bandwidth ({measure}): {doc['memory_bandwidth_gbps']:.1f} GB/s",
             f"{'kernel':<24}{'GB/s':>8}{'of bandwidth':>14}{'baseline GB/s':>15}{'speedup':>9}"]
    for b in doc["benchmarks"]:
        frac = b.get("fraction_of_bandwidth")
        lines.append(f"{b['name']:<24}{b['value']:8.2f}"
                     f"{'' if frac is None else f'{100 * frac:.0f} %':>14}"
                     f"{b['baseline']:15.2f}{b['speedup']:8.1f}x")
    return "\n".join(lines)

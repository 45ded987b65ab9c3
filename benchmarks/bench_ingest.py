"""Ingest benchmark: uncompressed 512 x 512 CT slices through the site's ingest pipeline.

Prints, as medians of several runs on the same files:
- the plain pydicom loop (`dcmread` + `pixel_array`, one process): the baseline;
- fedsilo's tree ingest end to end (`ingest_tree` + `complete_series`: read, checks,
  de-identify, decode, HU + window + resample, store, series assembly), in slices/s and as a
  multiple of the baseline — issue 3's target on 2 cores is >= 1.7x;
- what preprocessing adds to read + decode, timed stage by stage in one process over the same
  files: read + decode is `read_image` (read, checks, pseudonyms, decoded frames),
  preprocessing is the in-plane step of every slice plus each series' depth resample — the
  target is <= 15 %. The same preprocessing time is also shown against the plain loop.

Usage: python benchmarks/bench_ingest.py [--slices 2000] [--series-slices 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from agent.config import ImagingSpec
from agent.demo import ct
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.preprocess import check_positions, preprocess_planes
from agent.ingest.reader import read_image

SPEC = ImagingSpec(depth=16, size=128)


def make_slices(root: Path, n: int, per_series: int, rng: np.random.Generator) -> list[Path]:
    scanner = ct.Scanner("BENCH", "Bench 512", noise_hu=5.0, offset_hu=0.0, slice_mm=1.0)
    paths: list[Path] = []
    series = 0
    while len(paths) < n:
        k = min(per_series, n - len(paths))
        hu = rng.normal(30.0, 20.0, (k, 512, 512))
        paths += ct.write_series(root / f"s{series:03d}", f"BENCH-{series}", hu, scanner)
        series += 1
        print(f"\rwriting slices: {len(paths)}/{n}", end="", flush=True)
    print()
    return paths


def plain_loop(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p).pixel_array  # noqa: B018 - decoding is the point
    return time.perf_counter() - t


def pipeline_run(root: Path, state: Path) -> float:
    """Seconds to ingest the tree and complete every series, on a fresh state directory."""
    pipeline = IngestPipeline(state, SPEC)
    t = time.perf_counter()
    try:
        pipeline.ingest_tree(root)
        done = pipeline.complete_series(quiet_s=0.0, now=time.time() + 1)
    finally:
        pipeline.close()  # timed too: it waits for the pending files' removal
    seconds = time.perf_counter() - t
    if not done:
        raise SystemExit("benchmark error: no series was completed")
    return seconds


def stage_times(paths: list[Path], secret: bytes) -> tuple[float, float]:
    """(read + decode seconds, preprocessing seconds) over every file, in one process."""
    import kernels

    k = kernels.get_backend("auto")
    read = prep = 0.0
    by_series: dict[Path, list[tuple[float, np.ndarray]]] = {}
    for p in paths:
        t0 = time.perf_counter()
        image = read_image(p, secret)
        t1 = time.perf_counter()
        assert image.header is not None and image.frames is not None
        planes, _ = preprocess_planes(image.frames, [(g.slope, g.intercept)
                                                     for g in image.header.geometry],
                                      "CT", SPEC, k)
        prep += time.perf_counter() - t1
        read += t1 - t0
        by_series.setdefault(p.parent, []).append((image.header.geometry[0].position[2],
                                                   planes[0]))
    for items in by_series.values():
        items.sort(key=lambda item: item[0])
        stack = np.stack([plane for _, plane in items])
        t = time.perf_counter()
        k.resample_depth(stack, check_positions([z for z, _ in items]), SPEC.depth)
        prep += time.perf_counter() - t
    return read, prep


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--series-slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.slices
    print(f"{os.cpu_count()} CPUs; {n} uncompressed 512x512 CT slices, "
          f"{args.series_slices} per series; grid {SPEC.depth}x{SPEC.size}x{SPEC.size}")
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-ingest-") as tmp:
        root = Path(tmp) / "dicom"
        paths = make_slices(root, n, args.series_slices, np.random.default_rng(0))
        plain, pipe, read, prep = [], [], [], []
        for i in range(args.repeats):
            plain.append(plain_loop(paths))
            pipe.append(pipeline_run(root, Path(tmp) / f"state{i}"))
            r, q = stage_times(paths, b"b" * 32)
            read.append(r)
            prep.append(q)
            print(f"[{i + 1}/{args.repeats}] plain {n / plain[-1]:.0f} slices/s, fedsilo "
                  f"{n / pipe[-1]:.0f} slices/s ({plain[-1] / pipe[-1]:.2f}x); stages: "
                  f"read+decode {1e6 * r / n:.0f} us, preprocessing {1e6 * q / n:.0f} us "
                  "per slice", flush=True)
    p, e = statistics.median(plain), statistics.median(pipe)
    r, q = statistics.median(read), statistics.median(prep)
    print()
    print(f"plain pydicom loop (dcmread + pixel_array)       {n / p:7.0f} slices/s  (baseline)")
    print(f"fedsilo ingest end to end (read ... store series) {n / e:7.0f} slices/s  "
          f"= {p / e:.2f}x the plain loop (target >= 1.7x)")
    print(f"first run (forkserver and readers starting cold)  {n / pipe[0]:7.0f} slices/s  "
          f"= {plain[0] / pipe[0]:.2f}x")
    print(f"read + decode {1e6 * r / n:.0f} us/slice, preprocessing {1e6 * q / n:.0f} us/slice: "
          f"preprocessing adds {100 * q / r:.1f} % to read + decode (target <= 15 %), "
          f"{100 * q / p:.1f} % of the plain loop's read + decode")


main()

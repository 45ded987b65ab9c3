"""onnxruntime on the exported model against the project's own forward pass, one process.

Models from `agent.demo.models.demo_model` on the demo's plan (10 clinical features, 14
encoded columns): seeded params with a seeded perturbation, the output bias centred so
probabilities are not saturated.
  logistic, mlp [32, 16]   clinical rows; batch 1 (a site scoring one patient) and 4096
  cnn_fused                the demo's CNN (conv [4, 8], kernel 3) on the demo grid (8 x 32 x
                           32), images already preprocessed onto the grid; batch 1 and 64
Ways of scoring each batch, all measured in this process:
  project     apply_standardization (and the site's per-voxel image standardisation), then
              models.predict_proba with kernels.get_backend("auto") (Numba here): the baseline
  enc         onnxruntime, clinical="encoded" export: `features` float32 [N, 14] as encoded
  raw         onnxruntime, clinical="raw" export (what `fedsilo model export` writes): one
              input per feature, categoricals as strings encoded inside the graph; feeds built
              before timing
  score()     onnx_runtime.score(model, rows): raw, plus building the feeds from dict rows (what
              `fedsilo predict` and the site run), on load_exported's session
each with intra_op_num_threads=1 (the site's setting, "1t") and for enc and raw also with the
default thread count (intra_op_num_threads=0: one per physical core). Every configuration is
first checked: each onnxruntime way must agree with the project's probabilities within 1e-5.
A figure is the median of `--repeats` runs, each run timing enough calls to last ~0.2 s (after
a warm-up call); batch 1 as us per row (latency), larger batches as rows (studies) per second.

Usage: python benchmarks/bench_onnx.py [--repeats 5] [--seconds 0.2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.demo.models import demo_model, encoded_rows, grid_images, project_proba
from agent.learn import onnx_export as ox
from agent.learn.modelfile import SavedModel
from agent.learn.onnx_runtime import ExportedModel, load_exported, rows_from_encoded, score

TOL = 1e-5
TABULAR = {"logistic": (), "mlp": (32, 16)}  # name -> hidden widths
WAYS = ("project", "enc 1t", "raw 1t", "score() 1t", "enc def", "raw def")


def sessions(saved: SavedModel, tmp: Path, name: str) -> dict[str, Any]:
    """The exported files opened as the site opens them (load_exported: raw interface) and the
    encoded export with the same session options, at 1 thread and at the default count."""
    import onnxruntime as ort

    raw_path = ox.save_onnx(saved, tmp / f"{name}.onnx")
    enc = ox.to_onnx(saved, clinical=ox.ENCODED).SerializeToString()
    out: dict[str, Any] = {}
    for threads, tag in ((1, "1t"), (0, "def")):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        out[f"enc {tag}"] = ort.InferenceSession(enc, opts, providers=["CPUExecutionProvider"])
        out[f"raw {tag}"] = load_exported(raw_path, threads=threads)
    return out


def per_call_seconds(fn: Callable[[], object], repeats: int, seconds: float) -> float:
    """Median over `repeats` runs of the mean time of one call, each run ~`seconds` long."""
    fn()  # warm: first-call allocations, Numba dispatch, onnxruntime's arena
    t, calls = time.perf_counter(), 0
    while time.perf_counter() - t < seconds / 4:
        fn()
        calls += 1
    iters = max(1, round(seconds / ((time.perf_counter() - t) / calls)))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def configuration(saved: SavedModel, sess: dict[str, Any], kernels: ModuleType, n: int,
                  seed: int, repeats: int, seconds: float) -> dict[str, Any]:
    """Check, then time every way on one batch of n rows (and images)."""
    x = encoded_rows(saved, n, seed)
    images = grid_images(saved, n, seed + 1) if saved.layout.image_shape else None
    raw_model: ExportedModel = sess["raw 1t"]
    rows = rows_from_encoded(raw_model.features, x)
    raw_feeds = ox.row_feeds(raw_model.features, rows)
    enc_feeds: dict[str, np.ndarray] = {ox.INPUT_FEATURES: x}
    if images is not None:
        raw_feeds[ox.INPUT_IMAGE] = enc_feeds[ox.INPUT_IMAGE] = images

    def run(tag: str) -> Callable[[], np.ndarray]:
        if tag == "project":
            return lambda: project_proba(saved, kernels, x, images)
        if tag == "score() 1t":
            return lambda: score(raw_model, rows, images)
        kind, threads = tag.split()
        if kind == "enc":
            s = sess[tag]
            return lambda: s.run([ox.OUTPUT], enc_feeds)[0]
        s = sess[tag].session
        return lambda: s.run([ox.OUTPUT], raw_feeds)[0]

    want = run("project")().astype(np.float64)
    if n > 1 and np.ptp(want) < 0.1:
        raise SystemExit(f"{saved.layout.kind}: probabilities span {np.ptp(want):.3g}, a "
                         f"saturated model would agree with anything")
    diff = 0.0
    for tag in WAYS[1:]:
        got = run(tag)()
        if got.shape != want.shape:
            raise SystemExit(f"{tag}: shape {got.shape}, project {want.shape}")
        d = float(np.abs(got.astype(np.float64) - want).max())
        if not d <= TOL:
            raise SystemExit(f"{saved.layout.kind} N={n} {tag}: max |onnx - project| = {d:.3g} "
                             f"> {TOL}: not the same model, nothing to time")
        diff = max(diff, d)
    return {"max_abs_diff": diff,
            "seconds_per_call": {tag: per_call_seconds(run(tag), repeats, seconds)
                                 for tag in WAYS}}


def fmt(n: int, s: float) -> str:
    """Batch 1: us per row; otherwise rows per second (k or M)."""
    if n == 1:
        return f"{s * 1e6:.1f} us"
    rate = n / s
    return f"{rate / 1e6:.2f} M/s" if rate >= 1e6 else f"{rate / 1e3:.1f} k/s"


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.2, help="length of one timed run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import numba
    import onnxruntime as ort

    import kernels as kernel_backends
    from agent.learn.warm import warm_kernels

    print("warming the Numba kernels (compiles, or loads NUMBA_CACHE_DIR) ...", end="",
          flush=True)
    print(f" {warm_kernels():.1f} s", flush=True)
    kernels = kernel_backends.get_backend("auto")
    print(f"onnxruntime {ort.__version__} (intra_op 1t = 1 thread, def = default: one per "
          f"physical core); project forward: {kernels.__name__}, numba {numba.__version__} "
          f"with {numba.get_num_threads()} threads; os.cpu_count() = {os.cpu_count()}; median "
          f"of {args.repeats} runs of ~{args.seconds} s", flush=True)

    plan_batches = [(name, hidden, (1, 4096)) for name, hidden in TABULAR.items()]
    plan_batches.append(("cnn_fused", (), (1, 64)))
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-onnx-") as tmp:
        for i, (name, hidden, batches) in enumerate(plan_batches):
            saved = demo_model(name, hidden=hidden, seed=i, backend=kernels)
            sess = sessions(saved, Path(tmp), name)
            for n in batches:
                print(f"[{name} N={n}] checking and timing {len(WAYS)} ways ...", end="",
                      flush=True)
                r = configuration(saved, sess, kernels, n, 10 * i + n, args.repeats,
                                  args.seconds)
                results.append({"model": name, "params": saved.layout.size, "batch": n, **r})
                s = r["seconds_per_call"]
                print(f" max |onnx - project| {r['max_abs_diff']:.2g}; project "
                      f"{fmt(n, s['project'])}, enc 1t {fmt(n, s['enc 1t'])}", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)\n")

    print("batch 1: us per row (lower is better); larger batches: rows (studies) per second")
    head = f"{'model':<10}{'params':>7}{'N':>6}" + "".join(f"{w:>13}" for w in WAYS)
    print(head + f"{'enc 1t/proj':>12}{'max diff':>10}")
    for r in results:
        s, n = r["seconds_per_call"], r["batch"]
        print(f"{r['model']:<10}{r['params']:>7}{n:>6}"
              + "".join(f"{fmt(n, s[w]):>13}" for w in WAYS)
              + f"{s['project'] / s['enc 1t']:>11.1f}x{r['max_abs_diff']:>10.1e}")
    if args.json:
        args.json.write_text(json.dumps({
            "onnxruntime": ort.__version__, "numba": numba.__version__,
            "numba_threads": numba.get_num_threads(), "cpu_count": os.cpu_count(),
            "repeats": args.repeats, "results": results}, indent=2) + "\n")


main()

"""Fill the Numba on-disk cache at install time (`fedsilo warm-cache`).

A cold JIT of the cpu kernels takes seconds; with the cache filled, the daemon reaches its first
training step in well under a second. Each kernel is called on a tiny input (serial loop) and on
one just past `PARALLEL_MIN_WORK` (parallel loop), so both compiled variants land in the cache.
"""

from __future__ import annotations

import time
from types import ModuleType

import numpy as np

from kernels import get_backend


def _exercise(k: ModuleType, n: int) -> None:
    """Call every kernel once on inputs of about n elements (work), float32 like production."""
    rng = np.random.default_rng(0)
    width = 16
    rows = max(1, -(-n // (width * width)))
    x = rng.standard_normal((rows, width), dtype=np.float32)
    w = rng.standard_normal((width, width), dtype=np.float32)
    b = rng.standard_normal(width, dtype=np.float32)
    z = k.dense_forward(x, w, b)
    k.dense_backward(x, w, z)
    k.relu_backward(z, k.relu_forward(z))
    col = np.ascontiguousarray(z[:, 0])
    k.sigmoid(col)
    k.bce_with_logits(col, (col > 0).astype(np.float32))
    k.softmax_cross_entropy(z, np.zeros(rows, dtype=np.int64))
    size = max(n, 1)
    p, g = np.zeros(size, np.float32), np.ones(size, np.float32)
    k.sgd_momentum_step(p, g, np.zeros(size, np.float32), 0.1, 0.9, 0.0)
    k.adam_step(p, g, np.zeros(size, np.float32), np.zeros(size, np.float32), 0.1, 0.9, 0.999,
                1e-8, 1, 0.0)
    k.weighted_accumulate(p, g, 0.5)
    _exercise_codec(k, g)
    _exercise_imaging(k, n)
    _exercise_robust(k, g)


def _exercise_codec(k: ModuleType, x: np.ndarray) -> None:
    q, s = k.quantize_int8(x, 256, 0)
    k.dequantize_int8(q, s, 256)
    k.dequantize_accumulate(np.zeros_like(x), q, s, 256, 1.0)
    idx = k.topk_indices(x, max(1, x.size // 100))
    qk, sk = k.quantize_int8(np.ascontiguousarray(x[idx]), 256, 0)
    k.scatter_dequantize_accumulate(np.zeros_like(x), idx, qk, sk, 256, 1.0)


def _exercise_robust(k: ModuleType, x: np.ndarray) -> None:
    """The robust aggregation and privacy kernels on three sites' updates of x's size."""
    u = np.stack([x, -x, 0.5 * x])
    k.coordinate_median(u)
    k.trimmed_mean(u, 1)
    k.pairwise_sq_distances(u)
    k.clip_to_norm(x.copy(), 1.0)
    # privacy: secure aggregation's masks, DP-SGD's per-example clipping
    k.mask_accumulate(np.zeros(x.size, np.uint32), np.zeros((2, 32), np.uint8),
                      np.array([1, -1], np.int32))
    k.clip_rows_sum(u, 1.0)


def _exercise_imaging(k: ModuleType, n: int) -> None:
    """Imaging and CNN kernels at about n output elements: every stored pixel dtype, a conv
    stack's forward and backward."""
    side = max(2, 2 * int(np.sqrt(max(n, 1)) // 2))  # even, about sqrt(n)
    for dtype in (np.int16, np.uint16, np.int32, np.float32):
        k.preprocess_slice(np.ones((3, 3), dtype), 1.0, -1024.0, 40.0, 80.0, side, side)
    k.resample_depth(np.ones((2, side, side), np.float32), np.array([0.0, 1.0]), 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, side, side), dtype=np.float32)
    w = rng.standard_normal((1, 1, 3, 3), dtype=np.float32)
    y = k.conv2d_forward(x, w, np.zeros(1, np.float32))
    k.conv2d_backward(x, w, y)
    pooled, arg = k.maxpool2_forward(y)
    k.maxpool2_backward(pooled, arg, y.shape)
    k.global_avgpool_backward(k.global_avgpool_forward(y), y.shape)


def warm_kernels() -> float:
    """Compile (or load from the cache) every cpu kernel once; returns the seconds it took.

    Raises ValueError naming the reason when the cpu backend is unavailable (no Numba).
    """
    start = time.perf_counter()
    cpu = get_backend("cpu")
    _exercise(cpu, 1)
    _exercise(cpu, cpu.PARALLEL_MIN_WORK)
    return time.perf_counter() - start

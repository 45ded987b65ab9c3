"""CuPy robust aggregation kernels: the GPU twins of `kernels.ref_robust`, simple on purpose.

Median and trimmed mean sort the [k, n] matrix along the sites (cupy.sort, one extra copy of
the matrix on the device) and read the middle rows, with the oracle's arithmetic: the float32
mean of the two middle values, or the kept values summed in float64 and rounded once.
Distances and norms are float64 reductions over n, one per pair or row (k is small). Inputs
must be finite (see ref_robust). Arguments may be numpy arrays (results come back to the host)
or CuPy arrays (results stay on the device); importing never needs CuPy.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from kernels.gpu_common import ARRAY_TYPES, cp, like, to_device
from kernels.ref_robust import check_trim, check_updates, clip_in_place


@functools.cache
def _sq_dist_kernel() -> Any:
    # Inputs x, y: `a` and `b` are the reduction's own operand names.
    return cp.ReductionKernel("float32 x, float32 y", "float64 d",
                              "((double)x - (double)y) * ((double)x - (double)y)",
                              "a + b", "d = a", "0", "fedsilo_sq_dist",
                              reduce_type="float64")


@functools.cache
def _norm_kernel() -> Any:
    return cp.ReductionKernel("float32 x", "float64 s", "(double)x * (double)x", "a + b",
                              "s = sqrt(a)", "0", "fedsilo_l2_norm", reduce_type="float64")


def coordinate_median(updates: Any) -> Any:
    """See `kernels.ref_robust.coordinate_median`."""
    check_updates(updates, ARRAY_TYPES)
    k = updates.shape[0]
    s = cp.sort(to_device(updates), axis=0)
    if k % 2:
        out = s[k // 2].copy()
    else:
        out = (s[k // 2 - 1] + s[k // 2]) / cp.float32(2)
    return like(out, updates)


def trimmed_mean(updates: Any, trim: int) -> Any:
    """See `kernels.ref_robust.trimmed_mean`."""
    check_updates(updates, ARRAY_TYPES)
    k = updates.shape[0]
    t = check_trim(trim, k)
    kept = cp.sort(to_device(updates), axis=0)[t:k - t]
    out = (kept.sum(axis=0, dtype=cp.float64) / (k - 2 * t)).astype(cp.float32)
    return like(out, updates)


def pairwise_sq_distances(updates: Any) -> np.ndarray:
    """See `kernels.ref_robust.pairwise_sq_distances`; [k, k] comes back where updates live."""
    check_updates(updates, ARRAY_TYPES)
    k = updates.shape[0]
    u = to_device(updates)
    d2 = cp.zeros((k, k), dtype=cp.float64)
    kernel = _sq_dist_kernel()
    for i in range(k):
        for j in range(i + 1, k):
            d2[i, j] = kernel(u[i], u[j])
    return like(d2 + d2.T, updates)


def l2_norms(updates: Any) -> Any:
    """See `kernels.ref_robust.l2_norms`."""
    check_updates(updates, ARRAY_TYPES)
    return like(_norm_kernel()(to_device(updates), axis=1), updates)


def clip_to_norm(update: Any, max_norm: float) -> float:
    """See `kernels.ref_robust.clip_to_norm`; `update` is scaled where it lives."""
    return clip_in_place(update, max_norm, l2_norms, ARRAY_TYPES)

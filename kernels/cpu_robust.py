"""Numba robust aggregation kernels: the compiled twins of `kernels.ref_robust`.

The order statistics (median, trimmed mean) work on a block of B parameters at a time: the k
rows of the block are copied into a small [k, B] buffer that stays in L1/L2, and sorted per
column by a sorting network (Batcher's odd-even merge sort, pruned to the output positions the
statistic reads). Each compare-exchange is a branch-free min/max over the B columns, so it runs
as SIMD over parameters, instead of a branchy insertion sort of k values per parameter or
np.sort on a strided column. Blocks run in parallel (prange).

Distances and norms accumulate in float64 per block of columns into a partial [block, k, k]
(or [block, k]) array, summed afterwards in block order: the result depends on n only, not on
the number of threads, and equals the serial loop bit for bit. Within a block those float64
sums may be reassociated (SIMD lanes; see `_sum_jit`), so they match the oracle to ~1e-15,
not bit for bit. Inputs must be finite (see ref_robust); nothing here checks again.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from kernels.cpu_jit import jit as _jit
from kernels.cpu_jit import parallel as _parallel
from kernels.cpu_jit import pjit as _pjit
from kernels.ref_robust import check_trim, check_updates, clip_in_place

_F32 = np.float32
_MAX_PARTIALS = 1024  # column chunks of the distance / norm sums (bounds the partial arrays)


# ---------------------------------------------------------------------------- networks


def batcher_network(k: int) -> list[tuple[int, int]]:
    """Compare-exchanges (lo, hi) that sort k values ascending: Batcher's odd-even merge sort
    for the next power of two, keeping those inside [0, k) (the missing values act as +inf,
    never moved)."""
    p = 1
    while p < k:
        p *= 2
    pairs = []
    size = 1
    while size < p:
        step = size
        while step >= 1:
            for j in range(step % size, p - step, 2 * step):
                for i in range(min(step, p - j - step)):
                    a, b = i + j, i + j + step
                    if a // (2 * size) == b // (2 * size) and b < k:
                        pairs.append((a, b))
            step //= 2
        size *= 2
    return pairs


def prune(pairs: list[tuple[int, int]], outputs: set[int]) -> list[tuple[int, int]]:
    """The compare-exchanges that the values at `outputs` depend on (walked backwards)."""
    needed = set(outputs)
    kept = []
    for a, b in reversed(pairs):
        if a in needed or b in needed:
            kept.append((a, b))
            needed.update((a, b))
    return kept[::-1]


@functools.cache
def _network(k: int, lo: int, hi: int) -> np.ndarray:
    """int64 [m, 2]: the pruned network whose outputs lo..hi-1 are the sorted values there."""
    pairs = prune(batcher_network(k), set(range(lo, hi)))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _block_width(k: int) -> int:
    """Columns per block: the [k, B] float32 buffer about 32 KiB (L1), B a multiple of 16."""
    return max(64, min(2048, (8192 // k) // 16 * 16))


# ---------------------------------------------------------------------------- order statistics


@_jit
def _sort_block(u, lo, hi, net, buf):  # pragma: no cover - compiled
    """buf[:, :hi-lo] = the columns lo..hi-1 of u, sorted per column at the network's outputs.
    (Row slices, not buf[r, c]: with 2-D indexing LLVM does not vectorise the loops.)"""
    w = hi - lo
    for r in range(u.shape[0]):
        src = u[r, lo:hi]
        dst = buf[r]
        for c in range(w):
            dst[c] = src[c]
    for p in range(net.shape[0]):
        ra = buf[net[p, 0]]
        rb = buf[net[p, 1]]
        for c in range(w):
            x = ra[c]
            y = rb[c]
            ra[c] = y if y < x else x
            rb[c] = x if y < x else y


@_jit
def _median_block(u, out, j, width, net, buf):  # pragma: no cover - compiled
    k = u.shape[0]
    lo = j * width
    hi = min(lo + width, u.shape[1])
    _sort_block(u, lo, hi, net, buf)
    mid = buf[k // 2]
    o = out[lo:hi]
    if k % 2:
        for c in range(hi - lo):
            o[c] = mid[c]
    else:
        below = buf[k // 2 - 1]
        for c in range(hi - lo):
            o[c] = (below[c] + mid[c]) / _F32(2)


@_jit
def _median_serial(u, out, width, net):  # pragma: no cover - compiled
    buf = np.empty((u.shape[0], width), dtype=np.float32)
    for j in range((u.shape[1] + width - 1) // width):
        _median_block(u, out, j, width, net, buf)


@_pjit
def _median_parallel(u, out, width, net):  # pragma: no cover - compiled
    for j in prange((u.shape[1] + width - 1) // width):
        buf = np.empty((u.shape[0], width), dtype=np.float32)
        _median_block(u, out, j, width, net, buf)


@_jit
def _trimmed_block(u, out, j, width, trim, net, buf, acc):  # pragma: no cover - compiled
    k = u.shape[0]
    lo = j * width
    hi = min(lo + width, u.shape[1])
    w = hi - lo
    _sort_block(u, lo, hi, net, buf)
    for c in range(w):
        acc[c] = 0.0
    for r in range(trim, k - trim):  # ascending, in float64, as the oracle
        row = buf[r]
        for c in range(w):
            acc[c] += np.float64(row[c])
    kept = np.float64(k - 2 * trim)
    o = out[lo:hi]
    for c in range(w):
        o[c] = np.float32(acc[c] / kept)


@_jit
def _trimmed_serial(u, out, width, trim, net):  # pragma: no cover - compiled
    buf = np.empty((u.shape[0], width), dtype=np.float32)
    acc = np.empty(width, dtype=np.float64)
    for j in range((u.shape[1] + width - 1) // width):
        _trimmed_block(u, out, j, width, trim, net, buf, acc)


@_pjit
def _trimmed_parallel(u, out, width, trim, net):  # pragma: no cover - compiled
    for j in prange((u.shape[1] + width - 1) // width):
        buf = np.empty((u.shape[0], width), dtype=np.float32)
        acc = np.empty(width, dtype=np.float64)
        _trimmed_block(u, out, j, width, trim, net, buf, acc)


# ---------------------------------------------------------------------------- sums of squares


# Reassociation only for these float64 sums, so LLVM may split them over SIMD lanes (2x
# faster): they are far more precise than the float32 inputs whatever the order, and the
# order is still fixed for a given machine. The float32 kernels above stay strict.
_sum_jit = njit(cache=True, fastmath={"reassoc"})


@_sum_jit
def _sq_dist(xa, xb):  # pragma: no cover - compiled
    """sum (xa - xb)^2 in float64 over equal-length float32 slices."""
    s = 0.0
    for c in range(xa.shape[0]):
        d = np.float64(xa[c]) - np.float64(xb[c])
        s += d * d
    return s


@_sum_jit
def _sq_norm(x):  # pragma: no cover - compiled
    s = 0.0
    for c in range(x.shape[0]):
        v = np.float64(x[c])
        s += v * v
    return s


@_jit
def _dist_chunk(u, part, j, chunk, sub):  # pragma: no cover - compiled
    """part[j] = squared distances over columns [j * chunk, ...), in sub-blocks that stay in
    cache while every pair reads them."""
    k, n = u.shape
    end = min((j + 1) * chunk, n)
    for lo in range(j * chunk, end, sub):
        hi = min(lo + sub, end)
        for a in range(k):
            xa = u[a, lo:hi]
            for b in range(a + 1, k):
                part[j, a, b] += _sq_dist(xa, u[b, lo:hi])


@_jit
def _dist_serial(u, part, chunk, sub):  # pragma: no cover - compiled
    for j in range(part.shape[0]):
        _dist_chunk(u, part, j, chunk, sub)


@_pjit
def _dist_parallel(u, part, chunk, sub):  # pragma: no cover - compiled
    for j in prange(part.shape[0]):
        _dist_chunk(u, part, j, chunk, sub)


@_jit
def _norm_chunk(u, part, j, chunk):  # pragma: no cover - compiled
    end = min((j + 1) * chunk, u.shape[1])
    for a in range(u.shape[0]):
        part[j, a] = _sq_norm(u[a, j * chunk:end])


@_jit
def _norm_serial(u, part, chunk):  # pragma: no cover - compiled
    for j in range(part.shape[0]):
        _norm_chunk(u, part, j, chunk)


@_pjit
def _norm_parallel(u, part, chunk):  # pragma: no cover - compiled
    for j in prange(part.shape[0]):
        _norm_chunk(u, part, j, chunk)


def _chunks(n: int) -> tuple[int, int]:
    """(number of column chunks, chunk width) of the float64 sums: a function of n only."""
    count = max(1, min(_MAX_PARTIALS, -(-n // 4096)))
    return count, max(1, -(-n // count))


# ---------------------------------------------------------------------------- facades


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """See `kernels.ref_robust.coordinate_median`; parallel over blocks of parameters."""
    check_updates(updates)
    k, n = updates.shape
    out = np.empty(n, dtype=np.float32)
    net = _network(k, (k - 1) // 2, k // 2 + 1)
    kernel = _median_parallel if _parallel(updates.size) else _median_serial
    kernel(updates, out, _block_width(k), net)
    return out


def trimmed_mean(updates: np.ndarray, trim: int) -> np.ndarray:
    """See `kernels.ref_robust.trimmed_mean`; parallel over blocks of parameters."""
    check_updates(updates)
    k, n = updates.shape
    t = check_trim(trim, k)
    out = np.empty(n, dtype=np.float32)
    kernel = _trimmed_parallel if _parallel(updates.size) else _trimmed_serial
    kernel(updates, out, _block_width(k), t, _network(k, t, k - t))
    return out


def pairwise_sq_distances(updates: np.ndarray) -> np.ndarray:
    """See `kernels.ref_robust.pairwise_sq_distances`; parallel over column chunks."""
    check_updates(updates)
    k, n = updates.shape
    count, chunk = _chunks(n)
    part = np.zeros((count, k, k), dtype=np.float64)
    kernel = _dist_parallel if _parallel(updates.size * k) else _dist_serial
    kernel(updates, part, chunk, _block_width(k))
    upper = part.sum(axis=0)  # chunk order: deterministic
    return upper + upper.T


def l2_norms(updates: np.ndarray) -> np.ndarray:
    """See `kernels.ref_robust.l2_norms`; parallel over column chunks."""
    check_updates(updates)
    k, n = updates.shape
    count, chunk = _chunks(n)
    part = np.zeros((count, k), dtype=np.float64)
    (_norm_parallel if _parallel(updates.size) else _norm_serial)(updates, part, chunk)
    return np.sqrt(part.sum(axis=0))


def clip_to_norm(update: np.ndarray, max_norm: float) -> float:
    """See `kernels.ref_robust.clip_to_norm`."""
    return clip_in_place(update, max_norm, l2_norms)

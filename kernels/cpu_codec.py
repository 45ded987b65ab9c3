"""Numba update codec kernels: the fused versions of `kernels.ref_codec`, bit for bit.

Quantization reads each value once (block max, then codes from the same cache-hot block);
dequantize-and-accumulate reads codes and the accumulator and writes the accumulator once, the
least memory traffic FedAvg over int8 updates allows (~9 bytes per parameter). Both run over
blocks in parallel when the vector is large. The splitmix64 draw is recomputed per element (a
few integer ops against a memory access), so no random array is ever read.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels.cpu_jit import jit as _jit
from kernels.cpu_jit import parallel as _parallel
from kernels.cpu_jit import pjit as _pjit
from kernels.ref_codec import (
    MAX_CODE,
    check_accumulate,
    check_block,
    check_codes,
    check_many,
    check_scatter,
    check_seed,
    check_topk,
    check_vector,
    n_blocks,
)

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_M24 = np.float32(2.0 ** -24)
_F32_MAX_CODE = np.float32(MAX_CODE)


@njit(cache=True, inline="always")
def _uniform(seed, index):  # pragma: no cover - compiled
    z = seed + (index + _U64(1)) * _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    z = z ^ (z >> _U64(31))
    return np.float32(z >> _U64(40)) * _M24


@_jit
def _quantize_block(x, q, scales, j, block, seed, offset):  # pragma: no cover - compiled
    """Block j; False when it holds NaN or infinity."""
    lo = j * block
    hi = min(lo + block, x.shape[0])
    m = np.float32(0.0)
    for i in range(lo, hi):
        a = abs(x[i])
        if not math.isfinite(a):
            return False
        m = max(m, a)
    s = m / _F32_MAX_CODE
    scales[j] = s
    if s == 0:
        q[lo:hi] = 0
        return True
    for i in range(lo, hi):
        v = x[i] / s + _uniform(seed, _U64(offset) + _U64(i))
        c = math.floor(v)
        q[i] = min(max(c, -MAX_CODE), MAX_CODE)
    return True


@_jit
def _quantize_serial(x, q, scales, block, seed, offset):  # pragma: no cover - compiled
    ok = True
    for j in range(scales.shape[0]):
        ok &= _quantize_block(x, q, scales, j, block, seed, offset)
    return ok


@_pjit
def _quantize_parallel(x, q, scales, block, seed, offset):  # pragma: no cover - compiled
    bad = 0
    for j in prange(scales.shape[0]):
        if not _quantize_block(x, q, scales, j, block, seed, offset):
            bad += 1
    return bad == 0


@_jit
def _dequantize_accumulate_block(acc, q, scales, j, block, w):  # pragma: no cover - compiled
    lo = j * block
    hi = min(lo + block, q.shape[0])
    s = scales[j]
    for i in range(lo, hi):
        acc[i] += w * (np.float32(q[i]) * s)


@_jit
def _dequantize_accumulate_serial(acc, q, scales, block, w):  # pragma: no cover - compiled
    for j in range(scales.shape[0]):
        _dequantize_accumulate_block(acc, q, scales, j, block, w)


@_pjit
def _dequantize_accumulate_parallel(acc, q, scales, block, w):  # pragma: no cover - compiled
    for j in prange(scales.shape[0]):
        _dequantize_accumulate_block(acc, q, scales, j, block, w)


@_jit
def _many_block(acc, q, scales, j, block, w):  # pragma: no cover - compiled
    """Block j for every site; the acc block stays in cache across sites. (Slices, not
    q[s, i]: with 2-D indexing LLVM did not vectorise the loop, 5x slower.)"""
    lo = j * block
    hi = min(lo + block, acc.shape[0])
    a = acc[lo:hi]
    for s in range(q.shape[0]):
        c = scales[s, j]
        ws = w[s]
        qs = q[s, lo:hi]
        for i in range(hi - lo):
            a[i] += ws * (np.float32(qs[i]) * c)


@_jit
def _many_serial(acc, q, scales, block, w):  # pragma: no cover - compiled
    for j in range(scales.shape[1]):
        _many_block(acc, q, scales, j, block, w)


@_pjit
def _many_parallel(acc, q, scales, block, w):  # pragma: no cover - compiled
    for j in prange(scales.shape[1]):
        _many_block(acc, q, scales, j, block, w)


@_jit
def _dequantize(q, scales, block, out):  # pragma: no cover - compiled
    for i in range(q.shape[0]):
        out[i] = np.float32(q[i]) * scales[i // block]


@_jit
def _select(a, threshold, k):  # pragma: no cover - compiled
    """Ascending indices of the values above `threshold` and, lowest index first, as many
    equal to it as make k."""
    out = np.empty(k, dtype=np.int64)
    above = 0
    for i in range(a.shape[0]):
        if a[i] > threshold:
            above += 1
    ties = k - above
    m = 0
    for i in range(a.shape[0]):
        x = a[i]
        if x > threshold or (x == threshold and ties > 0):
            if x == threshold:
                ties -= 1
            out[m] = i
            m += 1
    return out


@_jit
def _scatter_accumulate(acc, idx, q, scales, block, w):  # pragma: no cover - compiled
    for m in range(idx.shape[0]):
        acc[idx[m]] += w * (np.float32(q[m]) * scales[m // block])


# ---------------------------------------------------------------------------- facades


def quantize_int8(x: np.ndarray, block: int, seed: int, offset: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """See `kernels.ref_codec.quantize_int8`."""
    check_vector("x", x, np.float32)
    check_block(block)
    check_seed(seed, offset)
    q = np.empty(x.size, dtype=np.int8)
    scales = np.empty(n_blocks(x.size, block), dtype=np.float32)
    kernel = _quantize_parallel if _parallel(x.size) else _quantize_serial
    if not kernel(x, q, scales, int(block), _U64(seed), int(offset)):
        raise ValueError("update contains NaN or infinity")
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    check_codes(q, scales, block)
    out = np.empty(q.size, dtype=np.float32)
    _dequantize(q, scales, int(block), out)
    return out


def dequantize_accumulate(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                          weight: float) -> None:
    """In place acc += weight * (q * scale); parallel over blocks when large."""
    check_accumulate(acc, q, scales, block)
    kernel = _dequantize_accumulate_parallel if _parallel(acc.size) \
        else _dequantize_accumulate_serial
    kernel(acc, q, scales, int(block), np.float32(weight))


def dequantize_accumulate_many(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                               weights: np.ndarray) -> None:
    """In place acc += sum over sites of weights[s] * (q[s] * scale), one pass over acc:
    1 byte per site and 8 for the sum per parameter, instead of 9 per site."""
    check_many(acc, q, scales, block, weights)
    kernel = _many_parallel if _parallel(acc.size * max(1, weights.size)) else _many_serial
    kernel(acc, q, scales, int(block), weights)


def topk_indices(v: np.ndarray, k: int) -> np.ndarray:
    check_topk(v, k)
    # The k-th largest magnitude by numpy's introselect (C; Numba's np.partition is several
    # times slower), the selection in one compiled pass.
    a = np.abs(v)
    if not np.isfinite(a.max(initial=0.0)):
        raise ValueError("update contains NaN or infinity")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(a, v.size - k)[v.size - k]
    return _select(a, threshold, int(k))


def scatter_dequantize_accumulate(acc: np.ndarray, idx: np.ndarray, q: np.ndarray,
                                  scales: np.ndarray, block: int, weight: float) -> None:
    check_scatter(acc, idx, q, scales, block)
    _scatter_accumulate(acc, idx, q, scales, int(block), np.float32(weight))

"""Numba privacy kernels: the compiled twins of `kernels.ref_privacy`.

Mask expansion is one fused loop over the output: the blocks of the slice are cut into groups
of `_LANES` consecutive ChaCha20 blocks; for each group the state of all its blocks lives in a
small word-major buffer ([16 words, _LANES blocks], 1 KiB, in L1), every double round is one
loop over the lanes (straight-line code that LLVM turns into SIMD across blocks, as OpenSSL's
AVX2/AVX-512 ChaCha20 does), and the k masks are summed into a second such buffer before the
group's 16 * _LANES words of `acc` are read and written once. The keystream is never
materialised; chunks of groups run in parallel (prange). Integer arithmetic: the result is the
oracle's bit for bit, whatever the number of threads.

Clipping: norms of the rows in float64 (parallel over rows, each row summed by one thread),
then the scaled sum over chunks of columns (parallel), each chunk adding the rows in row order
into a float64 buffer: deterministic, and independent of the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kernels.cpu_jit import jit as _jit
from kernels.cpu_jit import parallel as _parallel
from kernels.cpu_jit import pjit as _pjit
from kernels.cpu_robust import _sq_norm
from kernels.ref_privacy import SIGMA, check_clip, check_masks, check_rows

_LANES = 16  # blocks generated together (16 uint32 lanes = one AVX-512 register)
_GROUPS = 8  # groups per parallel chunk: 128 blocks, 8 KiB of acc
_COLS = 2048  # columns per chunk of the clipped sum
_S0, _S1, _S2, _S3 = (int(v) for v in SIGMA)


# ---------------------------------------------------------------------------- ChaCha20


@_jit
def _rotl(v, r):  # pragma: no cover - compiled
    v = np.uint32(v)
    return np.uint32((v << np.uint32(r)) | (v >> np.uint32(32 - r)))


@_jit
def _qr(a, b, c, d):  # pragma: no cover - compiled
    """RFC 8439 2.1 quarter round on four uint32 words."""
    a = np.uint32(a + b)
    d = _rotl(d ^ a, 16)
    c = np.uint32(c + d)
    b = _rotl(b ^ c, 12)
    a = np.uint32(a + b)
    d = _rotl(d ^ a, 8)
    c = np.uint32(c + d)
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@_jit
def _double_rounds(x):  # pragma: no cover - compiled
    """10 double rounds on the word-major state x[16 * _LANES] (word i of lane q at
    i * _LANES + q), one loop over the lanes per double round (vectorised by LLVM; the lane
    count is a compile-time constant so it can tell the lanes apart)."""
    L = _LANES
    for _ in range(10):
        for q in range(L):
            x0, x4, x8, x12 = _qr(x[q], x[4 * L + q], x[8 * L + q], x[12 * L + q])
            x1, x5, x9, x13 = _qr(x[L + q], x[5 * L + q], x[9 * L + q], x[13 * L + q])
            x2, x6, x10, x14 = _qr(x[2 * L + q], x[6 * L + q], x[10 * L + q], x[14 * L + q])
            x3, x7, x11, x15 = _qr(x[3 * L + q], x[7 * L + q], x[11 * L + q], x[15 * L + q])
            x0, x5, x10, x15 = _qr(x0, x5, x10, x15)
            x1, x6, x11, x12 = _qr(x1, x6, x11, x12)
            x2, x7, x8, x13 = _qr(x2, x7, x8, x13)
            x3, x4, x9, x14 = _qr(x3, x4, x9, x14)
            x[q] = x0
            x[L + q] = x1
            x[2 * L + q] = x2
            x[3 * L + q] = x3
            x[4 * L + q] = x4
            x[5 * L + q] = x5
            x[6 * L + q] = x6
            x[7 * L + q] = x7
            x[8 * L + q] = x8
            x[9 * L + q] = x9
            x[10 * L + q] = x10
            x[11 * L + q] = x11
            x[12 * L + q] = x12
            x[13 * L + q] = x13
            x[14 * L + q] = x14
            x[15 * L + q] = x15


@_jit
def _mask_group(acc, kw, signs, nonce, start, b, x, init, sums):  # pragma: no cover
    """acc += the k signed masks over blocks b .. b+_LANES-1 (words outside acc skipped)."""
    L = _LANES
    for i in range(16 * L):
        sums[i] = 0
    for j in range(kw.shape[0]):
        for q in range(L):
            init[q] = _S0
            init[L + q] = _S1
            init[2 * L + q] = _S2
            init[3 * L + q] = _S3
            for i in range(8):
                init[(4 + i) * L + q] = kw[j, i]
            init[12 * L + q] = np.uint32(b + q)  # the 32-bit block counter
            init[13 * L + q] = nonce[0]
            init[14 * L + q] = nonce[1]
            init[15 * L + q] = nonce[2]
        for i in range(16 * L):
            x[i] = init[i]
        _double_rounds(x)
        if signs[j] > 0:
            for i in range(16 * L):
                sums[i] = np.uint32(sums[i] + np.uint32(x[i] + init[i]))
        else:
            for i in range(16 * L):
                sums[i] = np.uint32(sums[i] - np.uint32(x[i] + init[i]))
    n = acc.shape[0]
    for q in range(L):
        base = (b + q) * 16 - start
        if base >= 0 and base + 16 <= n:
            for i in range(16):
                acc[base + i] = np.uint32(acc[base + i] + sums[i * L + q])
        else:
            for i in range(16):
                w = base + i
                if 0 <= w < n:
                    acc[w] = np.uint32(acc[w] + sums[i * L + q])


@_jit
def _mask_chunk(acc, kw, signs, nonce, start, b0, b1, c):  # pragma: no cover - compiled
    x = np.empty(16 * _LANES, dtype=np.uint32)
    init = np.empty(16 * _LANES, dtype=np.uint32)
    sums = np.empty(16 * _LANES, dtype=np.uint32)
    lo = b0 + c * _GROUPS * _LANES
    hi = min(lo + _GROUPS * _LANES, b1)
    for b in range(lo, hi, _LANES):
        _mask_group(acc, kw, signs, nonce, start, b, x, init, sums)


@_jit
def _mask_serial(acc, kw, signs, nonce, start, b0, b1):  # pragma: no cover - compiled
    per = _GROUPS * _LANES
    for c in range((b1 - b0 + per - 1) // per):
        _mask_chunk(acc, kw, signs, nonce, start, b0, b1, c)


@_pjit
def _mask_parallel(acc, kw, signs, nonce, start, b0, b1):  # pragma: no cover - compiled
    per = _GROUPS * _LANES
    for c in prange((b1 - b0 + per - 1) // per):
        _mask_chunk(acc, kw, signs, nonce, start, b0, b1, c)


# ---------------------------------------------------------------------------- clipping


# A row's float64 sum of squares: kernels.cpu_robust's (SIMD reassociation inside one
# thread, so the order is fixed for a given machine).


@_jit
def _norms_serial(rows, sq):  # pragma: no cover - compiled
    for r in range(rows.shape[0]):
        sq[r] = _sq_norm(rows[r])


@_pjit
def _norms_parallel(rows, sq):  # pragma: no cover - compiled
    for r in prange(rows.shape[0]):
        sq[r] = _sq_norm(rows[r])


@_jit
def _sum_chunk(rows, scale, out, j):  # pragma: no cover - compiled
    n = rows.shape[1]
    lo = j * _COLS
    hi = min(lo + _COLS, n)
    acc = np.zeros(hi - lo, dtype=np.float64)
    for r in range(rows.shape[0]):  # row order, as the oracle
        s = scale[r]
        src = rows[r, lo:hi]
        for c in range(hi - lo):
            acc[c] += np.float64(src[c]) * s
    o = out[lo:hi]
    for c in range(hi - lo):
        o[c] = np.float32(acc[c])


@_jit
def _sum_serial(rows, scale, out):  # pragma: no cover - compiled
    for j in range((rows.shape[1] + _COLS - 1) // _COLS):
        _sum_chunk(rows, scale, out, j)


@_pjit
def _sum_parallel(rows, scale, out):  # pragma: no cover - compiled
    for j in prange((rows.shape[1] + _COLS - 1) // _COLS):
        _sum_chunk(rows, scale, out, j)


# ---------------------------------------------------------------------------- facades


def mask_accumulate(acc: np.ndarray, keys: np.ndarray, signs: np.ndarray,
                    start: int = 0) -> None:
    """See `kernels.ref_privacy.mask_accumulate`; fused, parallel over chunks of blocks."""
    s, words, sg = check_masks(acc, keys, signs, start)
    n = acc.shape[0]
    if n == 0 or words.shape[0] == 0:
        return
    b0, b1 = s // 16, (s + n + 15) // 16
    kernel = _mask_parallel if _parallel(n * words.shape[0] * 16) else _mask_serial
    kernel(acc, words, sg, np.zeros(3, dtype=np.uint32), np.int64(s), np.int64(b0),
           np.int64(b1))


def clip_rows_sum(rows: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """See `kernels.ref_privacy.clip_rows_sum`; parallel over rows, then over columns."""
    check_rows(rows)
    c = check_clip(clip)
    b, n = rows.shape
    sq = np.empty(b, dtype=np.float64)
    (_norms_parallel if _parallel(rows.size) else _norms_serial)(rows, sq)
    norms = np.sqrt(sq)
    over = norms > c
    scale = np.ones(b)
    scale[over] = c / norms[over]
    out = np.empty(n, dtype=np.float32)
    (_sum_parallel if _parallel(rows.size) else _sum_serial)(rows, scale, out)
    return out, int(np.count_nonzero(over))

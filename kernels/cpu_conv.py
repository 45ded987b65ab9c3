"""Numba CNN kernels: the same functions and signatures as `kernels.ref_conv`, compiled.

Design: one sample per `prange` iteration (the batch is the parallel axis). Per sample, the
input is unrolled once into columns (im2col: one row per (channel, ky, kx), zero where the "same"
padding reaches outside) so every multiply-add in the hot loops walks contiguous memory with no
edge tests, which LLVM vectorises without fastmath. Forward updates whole output planes;
backward runs pixel-major so its inner loops run along (channel, ky, kx) with independent
accumulators. The weight gradient sums over the batch: each sample writes its own share and the
shares are summed in sample order, so serial and parallel runs give the same bits. Facades share
argument checks with the reference and take only float32 C-contiguous arrays (one signature
each); serial or parallel by work size.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kernels.cpu_jit import F32 as _F32
from kernels.cpu_jit import jit as _jit
from kernels.cpu_jit import parallel as _parallel
from kernels.cpu_jit import pjit as _pjit
from kernels.ref_checks import check_f32
from kernels.ref_conv import (
    MAXPOOL_INDEX_DTYPE,
    check_avgpool_backward,
    check_conv,
    check_pool_backward,
    check_pool_input,
)

# ---------------------------------------------------------------------------- convolution


@_jit
def _im2col(xs, k, cols):  # pragma: no cover - compiled
    """cols[(c*k + ky)*k + kx, i*w + j] = xs[c, i + ky - p, j + kx - p], zero outside."""
    nc, h, w = xs.shape
    p = k // 2
    for c in range(nc):
        for ky in range(k):
            for kx in range(k):
                row = cols[(c * k + ky) * k + kx]
                for i in range(h):
                    seg = row[i * w:(i + 1) * w]
                    ii = i + ky - p
                    if ii < 0 or ii >= h:
                        seg[:] = 0.0
                        continue
                    src = xs[c, ii]
                    for j in range(w):
                        jj = j + kx - p
                        seg[j] = src[jj] if 0 <= jj < w else _F32(0.0)


@_jit
def _col2im_add(dcols, k, dxs):  # pragma: no cover - compiled
    """The adjoint of _im2col: dxs = sum of dcols scattered back to where each value came from."""
    nc, h, w = dxs.shape
    p = k // 2
    dxs[...] = 0.0
    for c in range(nc):
        for ky in range(k):
            oy = ky - p
            for kx in range(k):
                ox = kx - p
                src = dcols[(c * k + ky) * k + kx]
                j0, j1 = max(0, -ox), min(w, w - ox)
                for i in range(max(0, -oy), min(h, h - oy)):
                    seg = src[i * w + j0:i * w + j1]
                    dst = dxs[c, i + oy, j0 + ox:j1 + ox]
                    for j in range(seg.shape[0]):
                        dst[j] += seg[j]


@_jit
def _conv_sample(x, w2, b, y, k, s):  # pragma: no cover - compiled
    """y[s, f] = b[f] + sum_q w2[f, q] * cols[q]: each update streams one contiguous plane."""
    nf, nq = w2.shape
    hw = x.shape[2] * x.shape[3]
    cols = np.empty((nq, hw), dtype=np.float32)
    _im2col(x[s], k, cols)
    ys = y[s].reshape((nf, hw))
    for f in range(nf):
        row = ys[f]
        row[:] = b[f]
        for q in range(nq):
            wv = w2[f, q]
            cq = cols[q]
            for t in range(hw):
                row[t] += wv * cq[t]


@_jit
def _conv_serial(x, w2, b, y, k):  # pragma: no cover - compiled
    for s in range(x.shape[0]):
        _conv_sample(x, w2, b, y, k, s)


@_pjit
def _conv_parallel(x, w2, b, y, k):  # pragma: no cover - compiled
    for s in prange(x.shape[0]):
        _conv_sample(x, w2, b, y, k, s)


@_jit
def _conv_backward_sample(x, w2, g, dx, dwp, k, s):  # pragma: no cover - compiled
    """dx[s] and this sample's share dwp[s] of dw. Pixel-major so the inner loops run along
    q = (c, ky, kx) with independent accumulators (vectorisable without reassociating)."""
    nf, nq = w2.shape
    hw = x.shape[2] * x.shape[3]
    cols = np.empty((nq, hw), dtype=np.float32)
    _im2col(x[s], k, cols)
    cols_t = np.ascontiguousarray(cols.T)
    dcols_t = np.zeros((hw, nq), dtype=np.float32)
    gs = g[s].reshape((nf, hw))
    dws = dwp[s]
    dws[...] = 0.0
    for t in range(hw):
        ct = cols_t[t]
        dct = dcols_t[t]
        for f in range(nf):
            gv = gs[f, t]
            wf = w2[f]
            dwf = dws[f]
            for q in range(nq):
                dwf[q] += gv * ct[q]
            for q in range(nq):
                dct[q] += gv * wf[q]
    _col2im_add(np.ascontiguousarray(dcols_t.T), k, dx[s])


@_jit
def _conv_reduce(g, dwp, dw2, db):  # pragma: no cover - compiled
    """Sum the per-sample shares in sample order (float64), so threads never change the bits."""
    nf, nq = dw2.shape
    for f in range(nf):
        for q in range(nq):
            acc = 0.0
            for s in range(dwp.shape[0]):
                acc += dwp[s, f, q]
            dw2[f, q] = acc
        acc = 0.0
        for s in range(g.shape[0]):
            for i in range(g.shape[2]):
                for j in range(g.shape[3]):
                    acc += g[s, f, i, j]
        db[f] = acc


@_jit
def _conv_backward_serial(x, w2, g, dx, dwp, dw2, db, k):  # pragma: no cover - compiled
    for s in range(x.shape[0]):
        _conv_backward_sample(x, w2, g, dx, dwp, k, s)
    _conv_reduce(g, dwp, dw2, db)


@_pjit
def _conv_backward_parallel(x, w2, g, dx, dwp, dw2, db, k):  # pragma: no cover - compiled
    for s in prange(x.shape[0]):
        _conv_backward_sample(x, w2, g, dx, dwp, k, s)
    _conv_reduce(g, dwp, dw2, db)


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y[n, f, h, w]: stride 1, zero "same" padding, odd k; samples run in parallel."""
    check_conv(x, w, b)
    for name, a in (("x", x), ("w", w), ("b", b)):
        check_f32(name, a)
    nf, k = w.shape[0], w.shape[2]
    y = np.empty((x.shape[0], nf, *x.shape[2:]), dtype=_F32)
    big = _parallel(y.size * w.shape[1] * k * k)
    (_conv_parallel if big else _conv_serial)(x, w.reshape(nf, -1), b, y, k)
    return y


def conv2d_backward(x: np.ndarray, w: np.ndarray,
                    dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dw, db): samples in parallel, each with its own share of dw, summed in sample order.

    The shares take batch x |w| float32 of scratch (a 32-sample batch through a 64->64 3x3
    conv: 4.7 MB).
    """
    check_conv(x, w, dy, backward=True)
    for name, a in (("x", x), ("w", w), ("dy", dy)):
        check_f32(name, a)
    nf, k = w.shape[0], w.shape[2]
    w2 = w.reshape(nf, -1)
    dx = np.empty_like(x)
    dw = np.empty_like(w)
    db = np.empty(nf, dtype=_F32)
    shares = np.empty((x.shape[0], *w2.shape), dtype=_F32)
    big = _parallel(dy.size * w.shape[1] * k * k)
    (_conv_backward_parallel if big else _conv_backward_serial)(
        x, w2, dy, dx, shares, dw.reshape(nf, -1), db, k)
    return dx, dw, db


# ---------------------------------------------------------------------------- pooling


@_jit
def _maxpool_sample(x, y, arg, s):  # pragma: no cover - compiled
    for c in range(x.shape[1]):
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                best = x[s, c, 2 * i, 2 * j]
                at = 0
                for q in range(1, 4):
                    v = x[s, c, 2 * i + q // 2, 2 * j + q % 2]
                    if v > best:  # strict: ties keep the first cell, like the reference
                        best = v
                        at = q
                y[s, c, i, j] = best
                arg[s, c, i, j] = at


@_jit
def _maxpool_serial(x, y, arg):  # pragma: no cover - compiled
    for s in range(x.shape[0]):
        _maxpool_sample(x, y, arg, s)


@_pjit
def _maxpool_parallel(x, y, arg):  # pragma: no cover - compiled
    for s in prange(x.shape[0]):
        _maxpool_sample(x, y, arg, s)


@_jit
def _unpool_sample(g, arg, dx, s):  # pragma: no cover - compiled
    for c in range(g.shape[1]):
        dx[s, c] = 0.0
        for i in range(g.shape[2]):
            for j in range(g.shape[3]):
                q = arg[s, c, i, j]
                dx[s, c, 2 * i + q // 2, 2 * j + q % 2] = g[s, c, i, j]


@_jit
def _unpool_serial(g, arg, dx):  # pragma: no cover - compiled
    for s in range(g.shape[0]):
        _unpool_sample(g, arg, dx, s)


@_pjit
def _unpool_parallel(g, arg, dx):  # pragma: no cover - compiled
    for s in prange(g.shape[0]):
        _unpool_sample(g, arg, dx, s)


def maxpool2_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max-pool, stride 2: (y, argmax int8 0..3 row-major within each window)."""
    check_pool_input(x)
    check_f32("x", x)
    n, c, h, w = x.shape
    y = np.empty((n, c, h // 2, w // 2), dtype=_F32)
    arg = np.empty(y.shape, dtype=MAXPOOL_INDEX_DTYPE)
    (_maxpool_parallel if _parallel(x.size) else _maxpool_serial)(x, y, arg)
    return y, arg


def maxpool2_backward(dy: np.ndarray, argmax: np.ndarray,
                      x_shape: tuple[int, ...]) -> np.ndarray:
    """dx[x_shape]: each dy to the cell that won the forward max, zeros elsewhere."""
    shape = check_pool_backward(dy, argmax, x_shape)
    check_f32("dy", dy)
    dx = np.empty(shape, dtype=_F32)
    (_unpool_parallel if _parallel(dx.size) else _unpool_serial)(dy, argmax, dx)
    return dx


@_jit
def _avg_sample(x, y, s):  # pragma: no cover - compiled
    scale = 1.0 / (x.shape[2] * x.shape[3])
    for c in range(x.shape[1]):
        acc = 0.0  # float64: a long float32 sum drifts
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                acc += x[s, c, i, j]
        y[s, c] = acc * scale


@_jit
def _avg_serial(x, y):  # pragma: no cover - compiled
    for s in range(x.shape[0]):
        _avg_sample(x, y, s)


@_pjit
def _avg_parallel(x, y):  # pragma: no cover - compiled
    for s in prange(x.shape[0]):
        _avg_sample(x, y, s)


@_jit
def _spread_sample(g, dx, s):  # pragma: no cover - compiled
    denom = _F32(dx.shape[2] * dx.shape[3])
    for c in range(dx.shape[1]):
        dx[s, c] = g[s, c] / denom


@_jit
def _spread_serial(g, dx):  # pragma: no cover - compiled
    for s in range(g.shape[0]):
        _spread_sample(g, dx, s)


@_pjit
def _spread_parallel(g, dx):  # pragma: no cover - compiled
    for s in prange(g.shape[0]):
        _spread_sample(g, dx, s)


def global_avgpool_forward(x: np.ndarray) -> np.ndarray:
    """y[n, c] = spatial mean of x[n, c], accumulated in float64."""
    check_f32("x", x, 4)
    y = np.empty(x.shape[:2], dtype=_F32)
    (_avg_parallel if _parallel(x.size) else _avg_serial)(x, y)
    return y


def global_avgpool_backward(dy: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """dx[n, c, h, w] = dy[n, c] / (h * w)."""
    n, c, h, w = check_avgpool_backward(dy, x_shape)
    check_f32("dy", dy, 2)
    dx = np.empty((n, c, h, w), dtype=_F32)
    (_spread_parallel if _parallel(dx.size) else _spread_serial)(dy, dx)
    return dx

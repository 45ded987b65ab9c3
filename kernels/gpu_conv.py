"""CuPy CNN kernels: the GPU twins of `kernels.ref_conv` (stride 1, "same" padding, NCHW).

Design: a convolution is one cuBLAS product. The input is unrolled once on the device (im2col)
into cols[(c, ky, kx), (n, i, j)] = x_pad[n, c, i + ky, j + kx], one strided copy per kernel
offset out of a zero-padded, channel-major copy of x, so forward is the single 2-D product
w[f, (c, ky, kx)] @ cols and backward two more: dw = dy @ cols.T and dcols = w.T @ dy, whose
columns are summed back onto the padded input by one slice-add per offset (col2im, the adjoint
of the unrolling). CuPy leaves TF32 off unless CUPY_TF32=1, so products are true float32; they
sum in a different order than the oracle's per-offset einsums, within float32 rounding. The
bias gradient and the global average pool sum in float64, like the cpu backend. The scratch
(cols and dcols) is c * k * k times the input: plain, and small at the model's sizes.

2x2 max-pooling compares the four strided views of x cell by cell with a strict `>` (ties keep
the first cell in row-major order, as numpy's argmax does) and routes the gradient back through
the same views. Everything is CuPy array operations, no custom kernels to compile.

Arguments are checked on the host exactly as the cpu backend checks them (the reference's shared
checks, then float32 only), before any device work, so the backends refuse the same inputs with
the same words. Inputs are numpy arrays; results come back as numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.gpu_common import cp, like, to_device
from kernels.ref_checks import check_f32
from kernels.ref_conv import (
    MAXPOOL_INDEX_DTYPE,
    check_avgpool_backward,
    check_conv,
    check_pool_backward,
    check_pool_input,
)

# The four cells of a 2x2 window in row-major order: (row offset, column offset).
_CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))


# ---------------------------------------------------------------------------- convolution


def _im2col(xd: Any, k: int) -> Any:
    """cols[(c*k + ky)*k + kx, (s*h + i)*w + j] = x[s, c, i + ky - p, j + kx - p], zero outside
    (p = k // 2), for the device array xd[n, c, h, w]."""
    n, c, h, w = xd.shape
    p = k // 2
    xp = cp.zeros((c, n, h + 2 * p, w + 2 * p), dtype=cp.float32)
    xp[:, :, p:p + h, p:p + w] = xd.transpose(1, 0, 2, 3)
    cols = cp.empty((c, k, k, n, h, w), dtype=cp.float32)
    for ky in range(k):
        for kx in range(k):
            cols[:, ky, kx] = xp[:, :, ky:ky + h, kx:kx + w]
    return cols.reshape(c * k * k, n * h * w)


def _col2im(dcols: Any, shape: tuple[int, ...], k: int) -> Any:
    """The adjoint of _im2col: dx[n, c, h, w] = each column value summed back where it came from."""
    n, c, h, w = shape
    p = k // 2
    d = dcols.reshape(c, k, k, n, h, w)
    dxp = cp.zeros((c, n, h + 2 * p, w + 2 * p), dtype=cp.float32)
    for ky in range(k):
        for kx in range(k):
            dxp[:, :, ky:ky + h, kx:kx + w] += d[:, ky, kx]
    return cp.ascontiguousarray(dxp[:, :, p:p + h, p:p + w].transpose(1, 0, 2, 3))


def _bias_grad(dyd: Any, nf: int) -> Any:
    """db[f] = sum of dy[:, f] (float64 accumulation, float32 result)."""
    if dyd.size == 0:
        return cp.zeros(nf, dtype=cp.float32)
    return dyd.sum(axis=(0, 2, 3), dtype=cp.float64).astype(cp.float32)


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y[n, f, h, w]: stride 1, zero "same" padding, odd k; im2col then one cuBLAS product."""
    check_conv(x, w, b)
    for name, a in (("x", x), ("w", w), ("b", b)):
        check_f32(name, a)
    n, _, h, wd = x.shape
    nf, k = w.shape[0], w.shape[2]
    bd = to_device(b)
    if x.size == 0 or w.size == 0:  # nothing to multiply: the bias alone (or an empty result)
        y = cp.zeros((n, nf, h, wd), dtype=cp.float32) + bd[None, :, None, None]
        return like(cp.ascontiguousarray(y), x)
    cols = _im2col(to_device(x), k)
    y2 = cp.matmul(to_device(w).reshape(nf, -1), cols)  # [f, n*h*w]
    y = y2.reshape(nf, n, h, wd).transpose(1, 0, 2, 3) + bd[None, :, None, None]
    return like(cp.ascontiguousarray(y), x)


def conv2d_backward(x: np.ndarray, w: np.ndarray,
                    dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dw, db): dw = dy @ cols.T and dx = col2im(w.T @ dy), two cuBLAS products."""
    check_conv(x, w, dy, backward=True)
    for name, a in (("x", x), ("w", w), ("dy", dy)):
        check_f32(name, a)
    n, _, h, wd = x.shape
    nf, k = w.shape[0], w.shape[2]
    dyd = to_device(dy)
    db = _bias_grad(dyd, nf)
    if x.size == 0 or w.size == 0:  # every product is empty or a sum of no terms
        dx = cp.zeros(x.shape, dtype=cp.float32)
        dw = cp.zeros(w.shape, dtype=cp.float32)
        return like(dx, x), like(dw, x), like(db, x)
    cols = _im2col(to_device(x), k)  # [c*k*k, n*h*w]
    w2 = to_device(w).reshape(nf, -1)  # [f, c*k*k]
    g2 = cp.ascontiguousarray(dyd.transpose(1, 0, 2, 3)).reshape(nf, n * h * wd)
    dw = cp.ascontiguousarray(cp.matmul(g2, cols.T)).reshape(w.shape)
    dx = _col2im(cp.matmul(w2.T, g2), x.shape, k)
    return like(dx, x), like(dw, x), like(db, x)


# ---------------------------------------------------------------------------- pooling


def _cells(a: Any) -> list[Any]:
    """The four strided views a[:, :, dy::2, dx::2] of a 2x2 grid, row-major."""
    return [a[:, :, oy::2, ox::2] for oy, ox in _CELLS]


def maxpool2_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max-pool, stride 2: (y, argmax int8 0..3 row-major within each window)."""
    check_pool_input(x)
    check_f32("x", x)
    first, *rest = _cells(to_device(x))
    best = cp.ascontiguousarray(first)
    arg = cp.zeros(best.shape, dtype=cp.int8)
    for q, cell in enumerate(rest, start=1):
        better = cell > best  # strict: ties keep the earlier cell, like numpy's argmax
        best = cp.where(better, cell, best)
        arg = cp.where(better, np.int8(q), arg)
    y = cp.ascontiguousarray(best.astype(cp.float32, copy=False))
    arg = cp.ascontiguousarray(arg.astype(MAXPOOL_INDEX_DTYPE, copy=False))
    return like(y, x), like(arg, x)


def maxpool2_backward(dy: np.ndarray, argmax: np.ndarray,
                      x_shape: tuple[int, ...]) -> np.ndarray:
    """dx[x_shape]: each dy to the cell that won the forward max, zeros elsewhere."""
    shape = check_pool_backward(dy, argmax, x_shape)
    check_f32("dy", dy)
    dyd, ad = to_device(dy), to_device(argmax)
    dx = cp.zeros(shape, dtype=cp.float32)
    zero = cp.zeros((), dtype=cp.float32)
    for q, cell in enumerate(_cells(dx)):
        cell[...] = cp.where(ad == np.int8(q), dyd, zero)
    return like(dx, dy)


def global_avgpool_forward(x: np.ndarray) -> np.ndarray:
    """y[n, c] = spatial mean of x[n, c], accumulated in float64."""
    check_f32("x", x, 4)
    y = to_device(x).mean(axis=(2, 3), dtype=cp.float64).astype(cp.float32)
    return like(cp.ascontiguousarray(y), x)


def global_avgpool_backward(dy: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """dx[n, c, h, w] = dy[n, c] / (h * w)."""
    n, c, h, w = check_avgpool_backward(dy, x_shape)
    check_f32("dy", dy, 2)
    dx = cp.empty((n, c, h, w), dtype=cp.float32)
    dx[...] = (to_device(dy) / np.float32(h * w))[:, :, None, None]
    return like(dx, dy)

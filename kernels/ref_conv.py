"""Plain-numpy CNN kernels: the oracle for the Numba and CuPy versions.

Design: tensors are NCHW, C-contiguous, float32 or float64 (outputs keep the input dtype, so
gradient checks run in double precision). A convolution is a sum over kernel offsets: for each
(ky, kx), a shifted window of the zero-padded input times the [f, c] weight slice — one einsum
per offset, obviously right and slow. Stride is 1 and padding "same" (k odd, pad k // 2), so the
spatial size never changes; 2x2 max-pooling halves it and records, per output, which of the four
window cells won (0..3 row-major, int8) so backward can route the gradient there. Ties go to the
first cell in that order.
"""

from __future__ import annotations

import numpy as np

from kernels.ref_checks import check_float

MAXPOOL_INDEX_DTYPE = np.int8


def _check(name: str, a: np.ndarray, ndim: int, dtype: np.dtype | None = None) -> None:
    """Float array of the given rank, C-contiguous, same dtype as its partners."""
    check_float(name, a, ndim, dtype, contiguous=True)


def check_conv(x: np.ndarray, w: np.ndarray, b_or_dy: np.ndarray | None = None,
               *, backward: bool = False) -> None:
    """x[n, c, h, w] and w[f, c, k, k] with k odd; b[f] (forward) or dy[n, f, h, w] (backward)."""
    _check("x", x, 4)
    _check("w", w, 4, x.dtype)
    f, c, kh, kw = w.shape
    if c != x.shape[1] or kh != kw or kh % 2 == 0:
        raise ValueError(f"w{w.shape} must be [f, {x.shape[1]}, k, k] with k odd")
    if b_or_dy is None:
        return
    if backward:
        _check("dy", b_or_dy, 4, x.dtype)
        if b_or_dy.shape != (x.shape[0], f, *x.shape[2:]):
            raise ValueError(f"dy{b_or_dy.shape} must be {(x.shape[0], f, *x.shape[2:])}")
    else:
        _check("b", b_or_dy, 1, x.dtype)
        if b_or_dy.shape != (f,):
            raise ValueError(f"b{b_or_dy.shape} must be ({f},)")


def check_pool_input(x: np.ndarray) -> None:
    """x[n, c, h, w] with h and w even (2x2 pooling covers every cell exactly once)."""
    _check("x", x, 4)
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"2x2 max-pooling needs even h and w, got {x.shape}")


def check_x_shape(x_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A 4-tuple of positive ints (the forward input's shape, given back to backward)."""
    if not isinstance(x_shape, (tuple, list)) or len(x_shape) != 4 or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
            for s in x_shape):
        raise ValueError(f"x_shape must be 4 positive integers, got {x_shape!r}")
    n, c, h, w = (int(s) for s in x_shape)
    return n, c, h, w


def check_pool_backward(dy: np.ndarray, argmax: np.ndarray,
                        x_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """dy and argmax [n, c, h/2, w/2]; argmax int8 in 0..3."""
    shape = check_x_shape(x_shape)
    _check("dy", dy, 4)
    n, c, h, w = shape
    if h % 2 or w % 2 or dy.shape != (n, c, h // 2, w // 2):
        raise ValueError(f"dy{dy.shape} does not pool x_shape {shape}")
    if not isinstance(argmax, np.ndarray) or argmax.dtype != MAXPOOL_INDEX_DTYPE:
        raise TypeError("argmax must be the int8 array maxpool2_forward returned")
    if argmax.shape != dy.shape or not argmax.flags.c_contiguous:
        raise ValueError(f"argmax{argmax.shape} must be C-contiguous of dy's shape {dy.shape}")
    if argmax.size and (argmax.min() < 0 or argmax.max() > 3):
        raise ValueError("argmax values must lie in 0..3")
    return shape


def check_avgpool_backward(dy: np.ndarray, x_shape: tuple[int, ...]
                           ) -> tuple[int, int, int, int]:
    """dy [n, c] for the forward input's shape x_shape [n, c, h, w]."""
    n, c, h, w = check_x_shape(x_shape)
    _check("dy", dy, 2)
    if dy.shape != (n, c):
        raise ValueError(f"dy{dy.shape} must be {(n, c)} for x_shape {(n, c, h, w)}")
    return n, c, h, w


# ---------------------------------------------------------------------------- convolution


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y[n, f, h, w] = b[f] + sum over c, ky, kx of w[f, c, ky, kx] * x_pad[n, c, h+ky, w+kx]."""
    check_conv(x, w, b)
    k = w.shape[2]
    p = k // 2
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    y = np.zeros((n, w.shape[0], h, wd), dtype=x.dtype)
    for ky in range(k):
        for kx in range(k):
            y += np.einsum("nchw,fc->nfhw", xp[:, :, ky:ky + h, kx:kx + wd], w[:, :, ky, kx])
    return y + b[None, :, None, None]


def conv2d_backward(x: np.ndarray, w: np.ndarray,
                    dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dw, db) of conv2d_forward: the same shifted windows, read the other way round."""
    check_conv(x, w, dy, backward=True)
    k = w.shape[2]
    p = k // 2
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for ky in range(k):
        for kx in range(k):
            window = xp[:, :, ky:ky + h, kx:kx + wd]
            dw[:, :, ky, kx] = np.einsum("nfhw,nchw->fc", dy, window)
            dxp[:, :, ky:ky + h, kx:kx + wd] += np.einsum("nfhw,fc->nchw", dy, w[:, :, ky, kx])
    dx = np.ascontiguousarray(dxp[:, :, p:p + h, p:p + wd])
    return dx, dw, dy.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------- pooling


def _windows(x: np.ndarray) -> np.ndarray:
    """[n, c, h/2, w/2, 4]: each 2x2 window's cells in row-major order."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, h // 2, w // 2, 4)


def maxpool2_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max-pool, stride 2: (y[n, c, h/2, w/2], argmax int8 0..3 within each window)."""
    check_pool_input(x)
    win = _windows(x)
    arg = win.argmax(axis=-1)  # first maximum on ties
    y = np.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
    return np.ascontiguousarray(y), arg.astype(MAXPOOL_INDEX_DTYPE)


def maxpool2_backward(dy: np.ndarray, argmax: np.ndarray,
                      x_shape: tuple[int, ...]) -> np.ndarray:
    """dx[x_shape]: each dy goes to the window cell that won the forward max; zeros elsewhere."""
    n, c, h, w = check_pool_backward(dy, argmax, x_shape)
    onehot = argmax[..., None] == np.arange(4)
    win = np.where(onehot, dy[..., None], np.zeros((), dy.dtype))
    dx = win.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
    return np.ascontiguousarray(dx)


def global_avgpool_forward(x: np.ndarray) -> np.ndarray:
    """y[n, c] = mean of x[n, c] over the spatial dimensions."""
    _check("x", x, 4)
    return x.mean(axis=(2, 3), dtype=np.float64).astype(x.dtype)


def global_avgpool_backward(dy: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """dx[n, c, h, w] = dy[n, c] / (h * w): the mean spreads its gradient evenly."""
    n, c, h, w = check_avgpool_backward(dy, x_shape)
    dx = np.empty((n, c, h, w), dtype=dy.dtype)
    dx[...] = (dy / dy.dtype.type(h * w))[:, :, None, None]
    return dx

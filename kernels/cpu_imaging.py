"""Numba imaging preprocessing: the fused one-pass versions of `kernels.ref_imaging`.

Design: `_slice_row` holds the math for one output row (bilinear sample of the stored value,
rescale to HU, window, clip — see ref_imaging for why that order is right), serial or `prange`
over rows by output size. Each output column's source columns and weight are computed once per
slice, and each row blends its two source rows first over their whole width (contiguous, so
it vectorises) before sampling columns: together 2x faster than sampling four scattered
pixels per output pixel. Each stored dtype
(int16, uint16, int32, float32) compiles its own specialisation; the facades share argument
checks with the reference, so every backend rejects the same inputs with the same words.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels.cpu_jit import F32 as _F32
from kernels.cpu_jit import jit as _jit
from kernels.cpu_jit import parallel as _parallel
from kernels.cpu_jit import pjit as _pjit
from kernels.ref_imaging import check_depth_args, check_slice_args, depth_coords

# ---------------------------------------------------------------------------- one slice


@_jit
def _src(d, scale, n_in):  # pragma: no cover - compiled
    """Pixel-centre source coordinate of output index d: (lower, upper, weight of upper)."""
    s = (d + 0.5) * scale - 0.5
    s = min(max(s, 0.0), n_in - 1.0)
    lo = min(int(math.floor(s)), n_in - 1)
    return lo, min(lo + 1, n_in - 1), s - lo


@_jit
def _columns(sx, w, n):  # pragma: no cover - compiled
    """Each output column's two source columns and weight, computed once per slice."""
    x0 = np.empty(n, dtype=np.int64)
    x1 = np.empty(n, dtype=np.int64)
    fx = np.empty(n, dtype=np.float64)
    for c in range(n):
        x0[c], x1[c], fx[c] = _src(c, sx, w)
    return x0, x1, fx


# The slice kernels may reassociate float math (a blend of two rows, then a clip; results stay
# within a few float64 ulps of the reference) so LLVM vectorises the row blend; the row body
# is inlined (a call per row cost a quarter of the kernel).
_fast = njit(cache=True, fastmath=True)
_fast_parallel = njit(cache=True, fastmath=True, parallel=True)


@njit(cache=True, fastmath=True, inline="always")
def _slice_row(p, out, r, sy, x0, x1, fx, slope, intercept, low, width,
               t):  # pragma: no cover - compiled
    """Output row r in two passes: blend the two source rows over their whole width into `t`
    (contiguous, so it vectorises), then sample `t` at each output column. Rescale and
    window are folded into the blend weights (both affine, exact to float64 rounding)."""
    y0, y1, fy = _src(r, sy, p.shape[0])
    wt = (1.0 - fy) * slope / width
    wb = fy * slope / width
    off = (intercept - low) / width
    top, bottom = p[y0], p[y1]
    for k in range(p.shape[1]):
        t[k] = wt * top[k] + wb * bottom[k]
    for c in range(out.shape[1]):
        left = t[x0[c]]
        out[r, c] = min(max(left + fx[c] * (t[x1[c]] - left) + off, 0.0), 1.0)


@_fast
def _slice_serial(p, out, sy, sx, slope, intercept, low, width):  # pragma: no cover - compiled
    x0, x1, fx = _columns(sx, p.shape[1], out.shape[1])
    t = np.empty(p.shape[1], dtype=np.float64)
    for r in range(out.shape[0]):
        _slice_row(p, out, r, sy, x0, x1, fx, slope, intercept, low, width, t)


@_fast_parallel
def _slice_parallel(p, out, sy, sx, slope, intercept, low, width):  # pragma: no cover
    x0, x1, fx = _columns(sx, p.shape[1], out.shape[1])
    for r in prange(out.shape[0]):
        t = np.empty(p.shape[1], dtype=np.float64)
        _slice_row(p, out, r, sy, x0, x1, fx, slope, intercept, low, width, t)


@_jit
def _all_finite(p):  # pragma: no cover - compiled
    for v in p.reshape(-1):
        if not math.isfinite(v):
            return False
    return True


def preprocess_slice(pixels: np.ndarray, slope: float, intercept: float, center: float,
                     width: float, out_rows: int, out_cols: int) -> np.ndarray:
    """Stored pixel values -> windowed HU in [0, 1] on an out_rows x out_cols grid, one pass.

    Raises ValueError on non-finite float32 pixels (a NaN would leak through the clip).
    """
    check_slice_args(pixels, slope, intercept, center, width, out_rows, out_cols)
    if not pixels.dtype.isnative:  # compiled for native byte order only
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    if pixels.dtype == _F32 and not _all_finite(pixels):
        raise ValueError("pixels contain NaN or infinity")
    h, w = pixels.shape
    out = np.empty((int(out_rows), int(out_cols)), dtype=_F32)
    low = float(center) - float(width) / 2.0
    kernel = _slice_parallel if _parallel(out.size) else _slice_serial
    kernel(pixels, out, h / out.shape[0], w / out.shape[1], float(slope), float(intercept), low,
           float(width))
    return out


# ---------------------------------------------------------------------------- depth


@_jit
def _depth_row(stack, seg, f, out, q):  # pragma: no cover - compiled
    """Row q of the flattened (depth x H) output rows."""
    rows = out.shape[1]
    j, r = q // rows, q % rows
    lo = seg[j]
    hi = min(lo + 1, stack.shape[0] - 1)
    wt = f[j]
    for c in range(out.shape[2]):
        out[j, r, c] = (1.0 - wt) * stack[lo, r, c] + wt * stack[hi, r, c]


@_jit
def _depth_serial(stack, seg, f, out):  # pragma: no cover - compiled
    for q in range(out.shape[0] * out.shape[1]):
        _depth_row(stack, seg, f, out, q)


@_pjit
def _depth_parallel(stack, seg, f, out):  # pragma: no cover - compiled
    for q in prange(out.shape[0] * out.shape[1]):
        _depth_row(stack, seg, f, out, q)


def resample_depth(stack: np.ndarray, positions: np.ndarray, depth: int) -> np.ndarray:
    """Linear interpolation of slices [k, H, W] at `positions` onto `depth` even positions.

    Output rows (of every plane) run in parallel when the output is large.
    """
    check_depth_args(stack, positions, depth)
    seg, f = depth_coords(positions, int(depth))
    out = np.empty((int(depth), *stack.shape[1:]), dtype=_F32)
    kernel = _depth_parallel if _parallel(out.size) else _depth_serial
    kernel(stack, seg, f, out)
    return out

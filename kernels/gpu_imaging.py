"""CuPy imaging preprocessing: the GPU twins of `kernels.ref_imaging`, one fused pass each.

Design: `preprocess_slice` runs one CUDA thread per output pixel. Each output row's and column's
source indices and weight are the oracle's own (`ref_imaging.source_coords`, computed on the
host: a few KB, exact), so the kernel only reads the four neighbouring stored values, blends
them, rescales to HU and windows, all in float64 like the oracle, and writes float32. Stored
values are read in their own type (int16, uint16, int32, float32: one compiled kernel each, the
C type substituted into the source), so no float64 copy of the slice is made. Multiplies and
adds are __dmul_rn / __dadd_rn so the compiler cannot contract them into an FMA that would round
differently from numpy: results equal the oracle's bit for bit, and out == in is exactly the
windowed input. `resample_depth` takes the oracle's `depth_coords` (host, tiny) and blends the
two neighbouring slices per output element on the device in float64, float32 out.

Arguments are checked on the host by the same functions the reference and cpu backends use,
before any device work, so every backend refuses the same inputs with the same words. Inputs
are numpy arrays; results come back as numpy arrays. Kernels compile on first use, never at
import (see `kernels.gpu_common`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.gpu_common import cp, launch_1d, like, raw_kernel, to_device
from kernels.ref_imaging import (
    check_depth_args,
    check_slice_args,
    depth_coords,
    source_coords,
)

_F32 = np.float32

# The stored pixel type of each accepted dtype, substituted for PIXEL in _SLICE_SOURCE.
_PIXEL_CTYPES = {np.int16: "short", np.uint16: "unsigned short", np.int32: "int",
                 np.float32: "float"}

_SLICE_SOURCE = r"""
extern "C" __global__ void preprocess_slice(
        const PIXEL* p, long long in_cols,
        const long long* y0, const long long* y1, const double* fy,
        const long long* x0, const long long* x1, const double* fx,
        float* out, long long out_cols, long long n,
        double slope, double intercept, double low, double width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long r = i / out_cols;
    long long c = i - r * out_cols;
    const PIXEL* top = p + y0[r] * in_cols;
    const PIXEL* bottom = p + y1[r] * in_cols;
    long long left = x0[c], right = x1[c];
    double wx = fx[c], wy = fy[r];
    /* the oracle's order: blend columns of the top and bottom rows, then the rows */
    double t = __dadd_rn(__dmul_rn(1.0 - wx, (double)top[left]),
                         __dmul_rn(wx, (double)top[right]));
    double b = __dadd_rn(__dmul_rn(1.0 - wx, (double)bottom[left]),
                         __dmul_rn(wx, (double)bottom[right]));
    double v = __dadd_rn(__dmul_rn(1.0 - wy, t), __dmul_rn(wy, b));
    double hu = __dadd_rn(__dmul_rn(v, slope), intercept);
    double z = __ddiv_rn(hu - low, width);
    out[i] = __double2float_rn(fmin(fmax(z, 0.0), 1.0));
}
"""

_DEPTH_SOURCE = r"""
extern "C" __global__ void resample_depth(const float* s, const long long* lo,
                                          const long long* hi, const double* f, float* out,
                                          long long plane, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long j = i / plane;
    long long q = i - j * plane;
    double w = f[j];
    double v = __dadd_rn(__dmul_rn(1.0 - w, (double)s[lo[j] * plane + q]),
                         __dmul_rn(w, (double)s[hi[j] * plane + q]));
    out[i] = __double2float_rn(v);
}
"""


def _dev(a: np.ndarray, dtype: type) -> Any:
    """A small host table (indices or weights) on the device, in the kernel's C type."""
    return to_device(np.ascontiguousarray(a, dtype=dtype))


def _slice_kernel(dtype: np.dtype) -> Any:
    """The compiled preprocess kernel for stored values of `dtype` (cached per source)."""
    source = _SLICE_SOURCE.replace("PIXEL", _PIXEL_CTYPES[dtype.type])
    return raw_kernel(source, "preprocess_slice")


def preprocess_slice(pixels: np.ndarray, slope: float, intercept: float, center: float,
                     width: float, out_rows: int, out_cols: int) -> np.ndarray:
    """Stored pixel values -> windowed HU in [0, 1] on an out_rows x out_cols grid (float32),
    one CUDA thread per output pixel, float64 math as in the oracle.

    Raises ValueError on non-finite float32 pixels (a NaN would leak through the clip).
    """
    check_slice_args(pixels, slope, intercept, center, width, out_rows, out_cols)
    rows, cols = int(out_rows), int(out_cols)
    h, w = pixels.shape
    y0, y1, fy = source_coords(rows, h)
    x0, x1, fx = source_coords(cols, w)
    native = pixels.dtype.newbyteorder("=")  # CuPy takes native byte order only
    pd = to_device(pixels if pixels.dtype == native else pixels.astype(native))
    if pixels.dtype == _F32 and not bool(cp.isfinite(pd).all()):
        raise ValueError("pixels contain NaN or infinity")
    out = cp.empty((rows, cols), dtype=cp.float32)
    low = float(center) - float(width) / 2.0
    launch_1d(_slice_kernel(pixels.dtype), out.size,
              (pd, np.int64(w), _dev(y0, np.int64), _dev(y1, np.int64), _dev(fy, np.float64),
               _dev(x0, np.int64), _dev(x1, np.int64), _dev(fx, np.float64), out,
               np.int64(cols), np.int64(out.size),
               np.float64(slope), np.float64(intercept), np.float64(low), np.float64(width)))
    return like(out, pixels)


def resample_depth(stack: np.ndarray, positions: np.ndarray, depth: int) -> np.ndarray:
    """Linear interpolation of slices [k, H, W] at `positions` onto `depth` even positions:
    the oracle's segment and weight per target, the float64 blend on the device."""
    check_depth_args(stack, positions, depth)
    seg, f = depth_coords(positions, int(depth))
    hi = np.minimum(seg + 1, stack.shape[0] - 1)
    plane = stack.shape[1] * stack.shape[2]
    out = cp.empty((int(depth), *stack.shape[1:]), dtype=cp.float32)
    launch_1d(raw_kernel(_DEPTH_SOURCE, "resample_depth"), out.size,
              (to_device(stack), _dev(seg, np.int64), _dev(hi, np.int64), _dev(f, np.float64),
               out, np.int64(plane), np.int64(out.size)))
    return like(out, stack)

"""Plain-numpy imaging preprocessing: the oracle for the fused cpu/gpu versions.

Design: a CT slice goes stored values -> Hounsfield units -> window -> model grid. The fast
backends do it in ONE pass over the output: for each output pixel, bilinearly sample the stored
values, rescale (`hu = v * slope + intercept`), window (`(hu - (center - width/2)) / width`,
clipped to [0, 1]). Sampling before rescaling equals rescaling before sampling because the
rescale is affine and the bilinear weights sum to 1; the window is applied after interpolation
because it is not affine (clipping). Pixel-centre mapping: src = (dst + 0.5) * in/out - 0.5,
clamped to [0, in - 1], so an image keeps its extent whatever the resolution and out == in is
the identity. The math runs in float64 (exact for every int32 stored value) and the result is
float32. `resample_depth` then interpolates the slice stack linearly onto `depth` evenly spaced
positions along the slice normal (slices become the CNN's channels).
"""

from __future__ import annotations

import math

import numpy as np

PIXEL_DTYPES = (np.int16, np.uint16, np.int32, np.float32)
MAX_GRID = 1 << 14  # a side of 16384 pixels is far beyond any CT grid; larger is a caller bug


def check_slice_args(pixels: np.ndarray, slope: float, intercept: float, center: float,
                     width: float, out_rows: int, out_cols: int) -> None:
    """Reject what the contract excludes (shared by every backend, so errors read the same)."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype.type not in PIXEL_DTYPES:
        raise TypeError(f"pixels must be int16, uint16, int32 or float32, got {pixels.dtype}")
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"pixels must be a non-empty 2-D array, got shape {pixels.shape}")
    if not pixels.flags.c_contiguous:
        raise ValueError("pixels must be C-contiguous")
    for name, value in (("slope", slope), ("intercept", intercept), ("center", center),
                        ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width!r}")
    for name, value in (("out_rows", out_rows), ("out_cols", out_cols)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 1 <= value <= MAX_GRID:
            raise ValueError(f"{name} must be an integer in [1, {MAX_GRID}], got {value!r}")


def check_depth_args(stack: np.ndarray, positions: np.ndarray, depth: int) -> None:
    """Stack float32 [k, H, W]; positions float64 [k], finite, strictly increasing; depth >= 1."""
    if not isinstance(stack, np.ndarray) or stack.dtype != np.float32:
        raise TypeError(f"stack must be a float32 array, got {getattr(stack, 'dtype', stack)}")
    if stack.ndim != 3 or stack.size == 0:
        raise ValueError(f"stack must be a non-empty 3-D array [k, H, W], got {stack.shape}")
    if not stack.flags.c_contiguous:
        raise ValueError("stack must be C-contiguous")
    if not isinstance(positions, np.ndarray) or positions.dtype != np.float64:
        raise TypeError("positions must be a float64 array")
    if positions.shape != (stack.shape[0],):
        raise ValueError(f"positions must have shape ({stack.shape[0]},), got {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise ValueError("positions must be finite")
    if np.any(np.diff(positions) <= 0):
        raise ValueError("positions must be strictly increasing")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) \
            or not 1 <= depth <= MAX_GRID:
        raise ValueError(f"depth must be an integer in [1, {MAX_GRID}], got {depth!r}")


def source_coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, weight of upper) per output index, pixel-centre mapped."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo


def preprocess_slice(pixels: np.ndarray, slope: float, intercept: float, center: float,
                     width: float, out_rows: int, out_cols: int) -> np.ndarray:
    """Stored pixel values -> windowed HU in [0, 1] on an out_rows x out_cols grid (float32).

    Raises ValueError on non-finite float32 pixels (a NaN would leak through the clip).
    """
    check_slice_args(pixels, slope, intercept, center, width, out_rows, out_cols)
    p = pixels.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("pixels contain NaN or infinity")
    y0, y1, fy = source_coords(out_rows, pixels.shape[0])
    x0, x1, fx = source_coords(out_cols, pixels.shape[1])
    fy, fx = fy[:, None], fx[None, :]
    top = (1.0 - fx) * p[y0][:, x0] + fx * p[y0][:, x1]
    bottom = (1.0 - fx) * p[y1][:, x0] + fx * p[y1][:, x1]
    v = (1.0 - fy) * top + fy * bottom
    hu = v * float(slope) + float(intercept)
    low = float(center) - float(width) / 2.0
    out = np.clip((hu - low) / float(width), 0.0, 1.0)
    return np.ascontiguousarray(out, dtype=np.float32)  # fancy indexing may leave F order


def depth_coords(positions: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment index i, weight of slice i+1) for `depth` targets from positions[0] to [-1].

    Targets are p0 + (p_last - p0) * j / (depth - 1) (depth 1: p0), the last one exactly p_last;
    a target inside [p_i, p_i+1] mixes slices i and i+1. With one slice, every target is it.
    """
    k = positions.shape[0]
    if k == 1:
        return np.zeros(depth, np.int64), np.zeros(depth, np.float64)
    p0, p1 = float(positions[0]), float(positions[-1])
    j = np.arange(depth, dtype=np.float64)
    t = p0 + (p1 - p0) * (j / (depth - 1)) if depth > 1 else np.array([p0])
    t[-1] = p1 if depth > 1 else p0
    seg = np.clip(np.searchsorted(positions, t, side="right") - 1, 0, k - 2)
    f = (t - positions[seg]) / (positions[seg + 1] - positions[seg])
    return seg.astype(np.int64), np.clip(f, 0.0, 1.0)


def resample_depth(stack: np.ndarray, positions: np.ndarray, depth: int) -> np.ndarray:
    """Linear interpolation of slices [k, H, W] at `positions` onto `depth` even positions."""
    check_depth_args(stack, positions, depth)
    seg, f = depth_coords(positions, depth)
    s = stack.astype(np.float64)
    hi = np.minimum(seg + 1, stack.shape[0] - 1)
    f3 = f[:, None, None]
    return np.ascontiguousarray((1.0 - f3) * s[seg] + f3 * s[hi], dtype=np.float32)

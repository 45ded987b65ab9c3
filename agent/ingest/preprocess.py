"""Turn one assembled series into the model's image: per slice HU + window + in-plane resample,
then resample along the slice normal onto the plan's depth.

Pure orchestration over the kernel namespace (no DICOM, no files): the caller has decoded the
pixels, read RescaleSlope/RescaleIntercept, projected each slice's position onto the normal and
sorted by it. Every site runs the same plan, so every site builds the same grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from agent.config import ImagingSpec


@dataclass(frozen=True)
class SliceInput:
    """One decoded slice: stored values, their rescale to HU, and where it lies on the normal."""

    pixels: np.ndarray  # 2-D int16/uint16/int32/float32 stored values, C-contiguous
    slope: float
    intercept: float
    position: float  # coordinate along the slice normal (mm)


def preprocess_series(slices: Sequence[SliceInput], imaging: ImagingSpec,
                      kernels: ModuleType) -> np.ndarray:
    """float32 [depth, size, size] in [0, 1] from slices sorted by position.

    Raises ValueError on an empty series or positions that are not finite and strictly
    increasing (two slices at one position mean a duplicate or a second series mixed in), and
    TypeError on a stored dtype the kernels do not take (8-bit values are widened losslessly).
    """
    if not slices:
        raise ValueError("a series needs at least one slice")
    positions = np.array([float(s.position) for s in slices], dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise ValueError("slice positions must be finite")
    steps = np.diff(positions)
    if np.any(steps <= 0):
        at = int(np.argmax(steps <= 0))
        raise ValueError(f"slice positions must be strictly increasing: slice {at + 1} at "
                         f"{positions[at + 1]} follows {positions[at]}")
    size = imaging.size
    stack = np.empty((len(slices), size, size), dtype=np.float32)
    for i, s in enumerate(slices):
        if not (math.isfinite(s.slope) and math.isfinite(s.intercept)):
            raise ValueError(f"slice {i}: rescale slope/intercept must be finite")
        stack[i] = kernels.preprocess_slice(_stored(s.pixels), s.slope,
                                            s.intercept, imaging.window_center,
                                            imaging.window_width, size, size)
    return kernels.resample_depth(stack, positions, imaging.depth)


def _stored(pixels: np.ndarray) -> np.ndarray:
    """C-contiguous stored values; 8-bit ones widened to int16 (exact), others as they are."""
    a = np.ascontiguousarray(pixels)
    return a.astype(np.int16) if a.dtype in (np.uint8, np.int8) else a

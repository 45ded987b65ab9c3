"""Turn one assembled series into the model's image: per slice HU + window + in-plane resample
(`preprocess_plane`, which the pipeline also runs on arrival), then resample along the slice
normal onto the plan's depth.

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
    positions = check_positions([s.position for s in slices])
    stack = np.empty((len(slices), imaging.size, imaging.size), dtype=np.float32)
    for i, s in enumerate(slices):
        stack[i] = preprocess_plane(s.pixels, s.slope, s.intercept, imaging, kernels, index=i)
    return kernels.resample_depth(stack, positions, imaging.depth)


def preprocess_plane(pixels: np.ndarray, slope: float, intercept: float,
                     imaging: ImagingSpec, kernels: ModuleType, *, index: int = 0
                     ) -> np.ndarray:
    """One slice's in-plane step (HU, window, resample to size x size), float32. Done on
    arrival when the grid is known, so only this small plane needs storing; exactly the
    call `preprocess_series` makes, so the result is the same."""
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(f"slice {index}: rescale slope/intercept must be finite")
    return kernels.preprocess_slice(_stored(pixels), slope, intercept, imaging.window_center,
                                    imaging.window_width, imaging.size, imaging.size)


def plane_label(imaging: ImagingSpec) -> str:
    """The in-plane preprocessing a pending slice went through (depth comes later)."""
    return (f"{imaging.modality}:{imaging.size}x{imaging.size}:"
            f"{imaging.window_center:g}/{imaging.window_width:g}")


def preprocess_planes(frames: np.ndarray, rescale: Sequence[tuple[float, float]],
                      modality: str, imaging: ImagingSpec | None,
                      kernels: ModuleType | None) -> tuple[np.ndarray, str | None]:
    """Every frame's in-plane step, labelled with `plane_label`, when the grid is known and
    the modality matches; else the frames unchanged and None. A kernel refusal also gives the
    frames back: completion redoes the step and reports the failure."""
    if imaging is None or kernels is None or modality != imaging.modality:
        return frames, None
    try:
        planes = np.empty((len(frames), imaging.size, imaging.size), dtype=np.float32)
        for i, (plane, (slope, intercept)) in enumerate(zip(frames, rescale, strict=True)):
            planes[i] = preprocess_plane(plane, slope, intercept, imaging, kernels)
    except Exception:  # noqa: BLE001 - completion redoes it and reports the reason
        return frames, None
    return planes, plane_label(imaging)


def check_positions(positions: Sequence[float]) -> np.ndarray:
    """Positions along the normal as float64, checked finite and strictly increasing."""
    if not len(positions):
        raise ValueError("a series needs at least one slice")
    out = np.array([float(p) for p in positions], dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError("slice positions must be finite")
    steps = np.diff(out)
    if np.any(steps <= 0):
        at = int(np.argmax(steps <= 0))
        raise ValueError(f"slice positions must be strictly increasing: slice {at + 1} at "
                         f"{out[at + 1]} follows {out[at]}")
    return out


def _stored(pixels: np.ndarray) -> np.ndarray:
    """C-contiguous stored values; 8-bit ones widened to int16 (exact), others as they are."""
    a = np.ascontiguousarray(pixels)
    return a.astype(np.int16) if a.dtype in (np.uint8, np.int8) else a

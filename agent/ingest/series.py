"""Series assembly rules, as pure functions over de-identified slice geometry.

Slices are ordered by their position along the slice normal (the cross product of the row and
column direction cosines in ImageOrientationPatient, dotted with ImagePositionPatient), never
by InstanceNumber, which scanners reset, skip or reuse. A series is accepted only when one
patient, one modality and one geometry (orientation, rows x columns, pixel spacing) hold for
every slice and the slices are evenly spaced; otherwise it gets one reason code:

- `mixed_patient`, `mixed_modality`: the SeriesInstanceUID was reused across patients/modalities
- `mixed_geometry`: orientation, matrix size or pixel spacing differ between slices
- `single_slice`: one slice where the plan's grid needs depth > 1 (nothing to interpolate)
- `duplicate_position`: two different instances at the same position (e.g. repeated or
  multi-echo acquisitions stored under one series)
- `missing_slice`: a gap larger than 1.5 x the (lower) median spacing (a slice never
  arrived)

Duplicates of one instance (same SOP pseudonym and frame) are no-ops: the first is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIXED_PATIENT = "mixed_patient"
MIXED_MODALITY = "mixed_modality"
MIXED_GEOMETRY = "mixed_geometry"
SINGLE_SLICE = "single_slice"
DUPLICATE_POSITION = "duplicate_position"
MISSING_SLICE = "missing_slice"
EMPTY_SERIES = "empty_series"

ORIENTATION_TOL = 1e-3  # direction cosines
SPACING_RTOL = 1e-3  # pixel spacing, relative
POSITION_TOL_MM = 1e-3  # two slices closer than this are at the same position
GAP_FACTOR = 1.5  # a gap above this x the median spacing is a missing slice


@dataclass(frozen=True)
class SliceGeom:
    """What assembly needs to know about one slice (one frame of one instance)."""

    key: str  # unique per slice: SOP pseudonym + frame
    patient: str
    modality: str
    rows: int
    columns: int
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True)
class SeriesCheck:
    """`reason` None: valid, with `order` (indices into the deduplicated slices) ascending
    along the normal and `positions` their coordinates along it (mm)."""

    reason: str | None
    slices: tuple[SliceGeom, ...]
    order: tuple[int, ...] = ()
    positions: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row cosines x column cosines."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def position_along_normal(position: Sequence[float], orientation: Sequence[float]) -> float:
    return float(np.dot(slice_normal(orientation), np.asarray(position, dtype=np.float64)))


def dedupe(slices: Sequence[SliceGeom]) -> tuple[SliceGeom, ...]:
    """First occurrence of each key (a resent instance changes nothing)."""
    seen: dict[str, SliceGeom] = {}
    for s in slices:
        seen.setdefault(s.key, s)
    return tuple(seen.values())


def _same_geometry(a: SliceGeom, b: SliceGeom) -> bool:
    """np.allclose's rule (|a - b| <= atol + rtol * |b|) in plain floats: this runs once per
    slice, and numpy's per-call overhead was most of a series' completion time."""
    return (a.rows == b.rows and a.columns == b.columns
            and all(abs(x - y) <= ORIENTATION_TOL
                    for x, y in zip(a.orientation, b.orientation, strict=True))
            and all(abs(x - y) <= SPACING_RTOL * abs(y)
                    for x, y in zip(a.pixel_spacing, b.pixel_spacing, strict=True)))


def check_series(slices: Sequence[SliceGeom], *, min_slices: int = 2) -> SeriesCheck:
    """Validate and order one series (`min_slices` is 2 when the grid's depth > 1, else 1)."""
    unique = dedupe(slices)
    if not unique:
        return SeriesCheck(EMPTY_SERIES, unique)
    first = unique[0]
    if any(s.patient != first.patient for s in unique):
        return SeriesCheck(MIXED_PATIENT, unique)
    if any(s.modality != first.modality for s in unique):
        return SeriesCheck(MIXED_MODALITY, unique)
    if not all(_same_geometry(first, s) for s in unique[1:]):
        return SeriesCheck(MIXED_GEOMETRY, unique)
    if len(unique) < min_slices:
        return SeriesCheck(SINGLE_SLICE, unique)
    normal = slice_normal(first.orientation)
    coords = np.array([float(normal @ np.asarray(s.position)) for s in unique])
    order = np.argsort(coords, kind="stable")
    ordered = coords[order]
    if len(unique) > 1:
        gaps = np.diff(ordered)
        if gaps.min() < POSITION_TOL_MM:
            return SeriesCheck(DUPLICATE_POSITION, unique)
        # The lower median, so that with three slices (two gaps) a missing middle one shows.
        median = float(np.sort(gaps)[(len(gaps) - 1) // 2])
        if len(gaps) > 1 and gaps.max() > GAP_FACTOR * median:
            return SeriesCheck(MISSING_SLICE, unique)
    return SeriesCheck(None, unique, tuple(int(i) for i in order),
                       tuple(float(c) for c in ordered))

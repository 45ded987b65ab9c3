"""Federated standardisation: every site shares per-column moments, never rows.

Each site sends `(count, total, total_sq)` per encoded column (NaN ignored). Moments add up, so
the coordinator's merge is a plain sum and the pooled mean and standard deviation are exactly what
one would get on the pooled rows. The vector form (`to_vector`) is what travels on the wire and
what secure aggregation can sum; it holds each column's three numbers together, so a vector
streamed in pieces (`MomentsStream`) can be summed whole columns at a time, never holding a
site's vector whole.

Variance is `total_sq / count - mean**2`, clipped at 0, in float64 (population variance, ddof=0,
like `np.std`). This one-pass formula loses relative precision when |mean| >> std
(about eps * mean**2 / var); for clinical features (ages, scores, minutes, mmol/L) that error is
far below anything that matters, and it keeps the exchanged statistic a simple sum. A column whose
standard deviation is below `TINY_RELATIVE_STD * max(1, |mean|)` is treated as constant (scale 1),
which also absorbs the rounding noise of that formula.

Pure numpy: no I/O, no logging, no config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TINY_RELATIVE_STD = 1e-6


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-column sufficient statistics of one site (or of several, once merged)."""

    count: np.ndarray  # float64 [d], non-NaN values per column
    total: np.ndarray  # float64 [d], sum of non-NaN values
    total_sq: np.ndarray  # float64 [d], sum of squares of non-NaN values

    def __post_init__(self) -> None:
        shapes = {np.shape(self.count), np.shape(self.total), np.shape(self.total_sq)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"moments must be three 1-D arrays of one length, got {shapes}")

    @property
    def width(self) -> int:
        return int(self.count.shape[0])

    def to_vector(self) -> np.ndarray:
        """float64 [3d]: (count, total, sum of squares) per column — the wire / secure-sum
        form."""
        return np.stack([self.count, self.total, self.total_sq], axis=1).astype(
            np.float64).ravel()

    @classmethod
    def from_vector(cls, v: np.ndarray) -> Moments:
        """Inverse of `to_vector`; rejects vectors no honest site could have sent."""
        v = np.asarray(v, dtype=np.float64)
        if v.ndim != 1 or v.shape[0] % 3 != 0:
            raise ValueError(f"moments vector must be 1-D with a length multiple of 3, "
                             f"got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("moments vector contains non-finite values")
        count, total, total_sq = (v.reshape(-1, 3)[:, j].copy() for j in range(3))
        if np.any(count < 0):
            raise ValueError("moments vector has negative counts")
        return cls(count=count, total=total, total_sq=total_sq)


def local_moments(x: np.ndarray) -> Moments:
    """Moments of one site's encoded matrix [n, d], ignoring NaN (missing under policy mean)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {x.shape}")
    present = ~np.isnan(x)
    filled = np.where(present, x, 0.0)
    return Moments(
        count=present.sum(axis=0).astype(np.float64),
        total=filled.sum(axis=0),
        total_sq=np.square(filled).sum(axis=0),
    )


class MomentsStream:
    """One site's moments vector (`to_vector` form, little-endian float64) summed into a pooled
    vector as its bytes arrive, whole columns at a time: a column's three numbers are checked
    (finite, count >= 0) before any is added, so a vector cut off or refused part way has added
    whole columns only — each pooled column is then the moments of the sites that reached it.
    `largest_count` is the most values this site had in any column (its row count)."""

    def __init__(self, pooled: np.ndarray, columns: int) -> None:
        self.pooled = pooled  # float64 [3 * width], summed in place
        self.columns = columns  # the leading columns whose counts give largest_count
        self.done = 0  # columns added
        self.largest_count = 0.0
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        self._pending += data
        whole = len(self._pending) // 24
        if self.done + whole > self.pooled.size // 3:
            raise ValueError("moments vector longer than announced")
        if whole == 0:
            return
        part = np.frombuffer(bytes(self._pending[:24 * whole]), dtype="<f8").reshape(whole, 3)
        if not np.all(np.isfinite(part)) or np.any(part[:, 0] < 0):
            raise ValueError("moments vector has non-finite values or negative counts")
        lo = 3 * self.done
        self.pooled[lo:lo + 3 * whole] += part.ravel()
        head = part[:max(0, self.columns - self.done), 0]
        self.largest_count = max(self.largest_count, float(head.max(initial=0.0)))
        self.done += whole
        del self._pending[:24 * whole]

    def finish(self) -> None:
        if self._pending or self.done != self.pooled.size // 3:
            raise ValueError(f"moments vector ended after {self.done} of "
                             f"{self.pooled.size // 3} columns")


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """Pooled moments: an element-wise sum (order does not matter)."""
    if not parts:
        raise ValueError("merge_moments needs at least one part")
    widths = {p.width for p in parts}
    if len(widths) != 1:
        raise ValueError(f"moments of different widths cannot be merged: {sorted(widths)}")
    return Moments(
        count=np.sum([p.count for p in parts], axis=0, dtype=np.float64),
        total=np.sum([p.total for p in parts], axis=0, dtype=np.float64),
        total_sq=np.sum([p.total_sq for p in parts], axis=0, dtype=np.float64),
    )


def standardizer(m: Moments, numeric_columns: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) float64 [d]. One-hot columns keep mean 0 / scale 1 so they stay 0/1.

    Scale is 1 where a column has fewer than two values or is (numerically) constant, so the
    division never blows up and such a column simply becomes 0 after centring.
    """
    d = m.width
    mean = np.zeros(d, dtype=np.float64)
    scale = np.ones(d, dtype=np.float64)
    idx = np.asarray(list(numeric_columns), dtype=np.int64)
    if idx.size == 0:
        return mean, scale
    if np.any(idx < 0) or np.any(idx >= d):
        raise ValueError(f"numeric column index out of range for width {d}")
    count = m.count[idx]
    safe = np.maximum(count, 1.0)
    mu = np.where(count > 0, m.total[idx] / safe, 0.0)
    var = np.maximum(m.total_sq[idx] / safe - mu * mu, 0.0)
    std = np.sqrt(var)
    usable = (count >= 2) & (std > TINY_RELATIVE_STD * np.maximum(1.0, np.abs(mu)))
    mean[idx] = mu
    scale[idx] = np.where(usable, std, 1.0)
    return mean, scale


def apply_standardization(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 [n, d] of (x - mean) / scale, NaN -> 0 (= mean imputation on the standard scale)."""
    x = np.asarray(x, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if x.ndim != 2 or mean.shape != (x.shape[1],) or scale.shape != (x.shape[1],):
        raise ValueError(f"shape mismatch: x {x.shape}, mean {mean.shape}, scale {scale.shape}")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(mean))):
        raise ValueError("mean must be finite and scale finite and positive")
    z = (x - mean) / scale
    z[np.isnan(z)] = 0.0
    return z.astype(np.float32)


IMAGE_SCALE_FLOOR = 0.05  # in window units (0..1): ~4 HU in an 80 HU window


def image_standardizer(m: Moments, floor: float = IMAGE_SCALE_FLOOR
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel (mean, scale) float32 for images flattened to [n, voxels].

    Why: a lesion changes a few percent of the voxels by a fraction of the window, which a
    CNN cannot pick out of raw intensities dominated by skull and air; against the federation's
    average head it stands out by several standard deviations. The floor keeps near-constant
    voxels (air, clipped bone) from amplifying noise."""
    count = np.maximum(m.count, 1.0)
    mean = m.total / count
    std = np.sqrt(np.maximum(m.total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)

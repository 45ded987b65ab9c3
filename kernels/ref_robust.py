"""Plain-numpy robust aggregation kernels: the oracle for the cpu/gpu versions (issue 12).

Byzantine-robust rules replace FedAvg's weighted mean by a statistic one bad site cannot drag
far: the coordinate-wise median, the trimmed mean, (multi-)Krum on pairwise distances, and a
norm bound on each update. All take the round's updates as one float32 matrix [k sites, n
parameters] (C-contiguous): the coordinator has to hold every update for these rules.

Inputs must be finite: the coordinator refuses an update holding NaN or infinity when it
arrives (as the codec does), so no kernel checks again in its hot loop; with a NaN the result
is unspecified.

Numerics, which every backend reproduces: the median of an even count is the float32 mean of
the two middle values, as np.median; the trimmed mean sums the kept values in float64 in
ascending order and rounds once to float32; distances and norms accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kernels.ref_checks import check_f32


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_updates(updates: np.ndarray, types: tuple[type, ...] = (np.ndarray,)) -> None:
    """A float32 C-contiguous [k, n] matrix with at least one update (row)."""
    check_f32("updates", updates, 2, types=types)
    if updates.shape[0] < 1:
        raise ValueError("updates must hold at least one update (row), got shape "
                         f"{updates.shape}")


def check_trim(trim: object, k: int) -> int:
    """Trimming `trim` from each end must leave at least one value: 2 * trim < k."""
    t = _check_int("trim", trim, 0)
    if 2 * t >= k:
        raise ValueError(f"trim {t} from each end of {k} updates leaves none: need 2 * trim < k")
    return t


def check_krum(k: int, f: object, m: object) -> tuple[int, int]:
    """Krum tolerates f bad sites only when k > 2f + 2; it selects 1 <= m <= k updates."""
    f = _check_int("f", f, 0)
    m = _check_int("m", m, 1)
    if k <= 2 * f + 2:
        raise ValueError(f"Krum with f={f} needs more than 2f + 2 = {2 * f + 2} updates, got {k}")
    if m > k:
        raise ValueError(f"cannot select m={m} of {k} updates")
    return f, m


def check_max_norm(max_norm: object) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating,
                                                               np.integer)) \
            or not np.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    return float(max_norm)


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """float32 [n]: per parameter the median over sites (even k: mean of the middle two)."""
    check_updates(updates)
    k = updates.shape[0]
    s = np.sort(updates, axis=0)
    if k % 2:
        return s[k // 2].copy()
    return (s[k // 2 - 1] + s[k // 2]) / np.float32(2)


def trimmed_mean(updates: np.ndarray, trim: int) -> np.ndarray:
    """float32 [n]: per parameter drop the `trim` largest and `trim` smallest values, mean of
    the rest (summed in float64, ascending)."""
    check_updates(updates)
    k = updates.shape[0]
    t = check_trim(trim, k)
    kept = np.sort(updates, axis=0)[t:k - t].astype(np.float64)
    return (kept.sum(axis=0) / (k - 2 * t)).astype(np.float32)


def pairwise_sq_distances(updates: np.ndarray) -> np.ndarray:
    """float64 [k, k]: squared Euclidean distance between every two updates, zero diagonal."""
    check_updates(updates)
    k = updates.shape[0]
    x = updates.astype(np.float64)
    d2 = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            d2[i, j] = d2[j, i] = np.sum((x[i] - x[j]) ** 2)
    return d2


def l2_norms(updates: np.ndarray) -> np.ndarray:
    """float64 [k]: the Euclidean norm of each update."""
    check_updates(updates)
    return np.sqrt(np.sum(updates.astype(np.float64) ** 2, axis=1))


def clip_in_place(update: np.ndarray, max_norm: float, norms: Callable[[np.ndarray], Any],
                  types: tuple[type, ...] = (np.ndarray,)) -> float:
    """`clip_to_norm` for any backend, given its `l2_norms` (`update` lives where it does)."""
    check_f32("update", update, 1, writable=True, types=types)
    bound = check_max_norm(max_norm)
    norm = float(norms(update.reshape(1, -1))[0])
    if norm > bound:
        update *= np.float32(bound / norm)
    return norm


def clip_to_norm(update: np.ndarray, max_norm: float) -> float:
    """In place: scale `update` (float32 [n]) to norm `max_norm` if its norm is larger (the
    norm-bound rule), by the float32 factor max_norm / norm. Returns the norm before
    clipping, for the round's log."""
    return clip_in_place(update, max_norm, l2_norms)


def multi_krum_select(d2: np.ndarray, f: int, m: int) -> list[int]:
    """Indices of the m updates with the lowest Krum scores, best first (ties: lower index).

    Shared by every backend (k is small: pure numpy). The score of update i is the sum of its
    k - f - 2 smallest squared distances to the others: an update near a crowd of honest ones
    scores low, an outlier high. m = 1 is Krum; m > 1 is multi-Krum (average the selection).
    """
    if not isinstance(d2, np.ndarray) or d2.dtype != np.float64 or d2.ndim != 2 \
            or d2.shape[0] != d2.shape[1]:
        raise ValueError("d2 must be a square float64 matrix [k, k], got "
                         f"{getattr(d2, 'dtype', type(d2).__name__)} {getattr(d2, 'shape', '')}")
    k = d2.shape[0]
    f, m = check_krum(k, f, m)
    if not np.all(np.isfinite(d2)):
        raise ValueError("d2 contains NaN or infinity")
    off = d2[~np.eye(k, dtype=bool)].reshape(k, k - 1)  # each row without its diagonal
    scores = np.sort(off, axis=1)[:, :k - f - 2].sum(axis=1)
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]

"""Argument checks shared by the numpy oracle modules (reference, ref_conv), so every
backend that reuses them rejects the same inputs with the same words."""

from __future__ import annotations

import numpy as np

FLOATS = (np.float32, np.float64)


def check_float(name: str, a: np.ndarray, ndim: int | None = None,
                dtype: np.dtype | None = None, *, contiguous: bool = False) -> None:
    """Reject what the contract excludes, so the oracle cannot silently broadcast or upcast:
    a float array, of rank `ndim`, of the same dtype as its partners, C-contiguous if asked."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype.type not in FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype} like the other inputs")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")

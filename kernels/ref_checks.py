"""Argument checks shared by the numpy oracle modules (reference, ref_conv) and the fast
backends, so every backend rejects the same inputs with the same words."""

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


def check_f32(name: str, a: np.ndarray, ndim: int | None = None, *, writable: bool = False,
              types: tuple[type, ...] = (np.ndarray,)) -> None:
    """Fast backends take only float32 C-contiguous arrays: anything else is a caller bug.
    `types` lets the gpu backend accept its device arrays too."""
    if not isinstance(a, types):
        kinds = " or ".join(t.__module__.split(".")[0] for t in types)
        raise TypeError(f"{name} must be a {kinds} array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not getattr(a.flags, "writeable", True):  # device arrays are always
        raise ValueError(f"{name} is updated in place but is read-only")

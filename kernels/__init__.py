"""Kernel backends by label: one namespace of the same functions per backend.

Like pydicom's decoder plugins, each backend is imported lazily (so `import kernels` never pulls
in Numba or CuPy) and, when it cannot be used, the registry records why, so an error can say
"gpu: cupy not installed" instead of a bare ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# The contract every backend module implements (same names, same signatures as reference.py).
KERNEL_NAMES = (
    "dense_forward",
    "dense_backward",
    "relu_forward",
    "relu_backward",
    "sigmoid",
    "bce_with_logits",
    "softmax_cross_entropy",
    "sgd_momentum_step",
    "adam_step",
    "add_proximal",
    "weighted_accumulate",
    "quantize_int8",
    "dequantize_int8",
    "dequantize_accumulate",
    "dequantize_accumulate_many",
    "topk_indices",
    "scatter_dequantize_accumulate",
    "preprocess_slice",
    "resample_depth",
    "conv2d_forward",
    "conv2d_backward",
    "maxpool2_forward",
    "maxpool2_backward",
    "global_avgpool_forward",
    "global_avgpool_backward",
    "coordinate_median",
    "trimmed_mean",
    "pairwise_sq_distances",
    "l2_norms",
    "clip_to_norm",
    "mask_accumulate",
    "clip_rows_sum",
)
BACKEND_NAMES = ("reference", "cpu", "gpu")

_loaded: dict[str, ModuleType] = {}
_unavailable: dict[str, str] = {}


def _load_reference() -> ModuleType:
    return importlib.import_module("kernels.reference")


def _load_cpu() -> ModuleType:
    if importlib.util.find_spec("numba") is None:
        raise _Unavailable("numba not installed")
    try:
        return importlib.import_module("kernels.cpu")
    except ImportError as exc:  # numba present but broken (e.g. numpy too new for it)
        raise _Unavailable(f"numba failed to import ({exc})") from exc


def _load_gpu() -> ModuleType:
    if importlib.util.find_spec("cupy") is None:
        raise _Unavailable("cupy not installed")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises its own CUDA errors when no driver is present
        raise _Unavailable(f"no CUDA device ({type(exc).__name__}: {exc})") from exc
    if count < 1:
        raise _Unavailable("no CUDA device")
    if importlib.util.find_spec("kernels.gpu") is None:
        raise _Unavailable("kernels/gpu.py is not built yet")
    return importlib.import_module("kernels.gpu")


_LOADERS = {"reference": _load_reference, "cpu": _load_cpu, "gpu": _load_gpu}


class _Unavailable(Exception):
    """Internal: a backend's dependency is missing; the message is the reason users see."""


def _probe(name: str) -> str | None:
    """Load `name` once; remember the module or the reason it cannot be used."""
    if name in _loaded:
        return None
    if name in _unavailable:
        return _unavailable[name]
    try:
        module = _LOADERS[name]()
    except _Unavailable as exc:
        _unavailable[name] = f"{name}: {exc}"
        return _unavailable[name]
    missing = [k for k in KERNEL_NAMES if not callable(getattr(module, k, None))]
    if missing:
        _unavailable[name] = f"{name}: backend lacks {', '.join(missing)}"
        return _unavailable[name]
    _loaded[name] = module
    return None


def available_backends() -> dict[str, str | None]:
    """Every known backend -> None if usable here, else the reason it is not.

    Probing imports the backend (Numba, CuPy), so call this when the answer is needed, not at
    import time.
    """
    return {name: _probe(name) for name in BACKEND_NAMES}


def get_backend(name: str = "auto") -> ModuleType:
    """The kernel namespace for `name`; "auto" is "cpu" when Numba imports, else "reference".

    Raises ValueError naming the reason when the backend is unknown or unusable here.
    """
    if name == "auto":
        name = "cpu" if _probe("cpu") is None else "reference"
    if name not in _LOADERS:
        raise ValueError(f"unknown kernel backend {name!r} (expected auto or one of "
                         f"{', '.join(BACKEND_NAMES)})")
    reason = _probe(name)
    if reason is not None:
        raise ValueError(f"kernel backend unavailable: {reason}")
    return _loaded[name]

"""Imported only by the tree readers' forkserver (see tree_pool): load the in-plane kernel and
the native DICOM walker there once, so every reader forked from it starts with them compiled
instead of paying the JIT-cache load (about 0.3 s) per reader."""

from __future__ import annotations

import numpy as np

try:
    import kernels
    from agent.ingest import dicom_native

    dicom_native.warm()

    _backend = kernels.get_backend("auto")
    for _dtype in (np.int16, np.uint16):
        _backend.preprocess_slice(np.zeros((2, 2), _dtype), 1.0, 0.0, 40.0, 80.0, 2, 2)
except Exception:  # noqa: BLE001, S110 - only a warm-up; readers load kernels themselves
    pass

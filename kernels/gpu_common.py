"""CuPy plumbing shared by the gpu kernel modules (gpu, gpu_codec, gpu_imaging, gpu_conv).

Importing never fails: without CuPy, or with one whose CUDA libraries are missing, `cp` is None
and the registry (`kernels._load_gpu`) has already said why; nothing here touches a device at
import time, and kernels are compiled on first use (CuPy caches them on disk).

Contract of the gpu backend: the same functions and signatures as `kernels.reference`. Every
function takes numpy arrays (results come back as numpy, arguments updated in place are updated
where they live), so callers and the shared tests need no change. The codec and aggregation
kernels also take CuPy arrays and then stay on the device: that is how the coordinator's sum
and the benchmarks use them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or CuPy present with its CUDA libraries missing
    cp = None

ARRAY_TYPES: tuple[type, ...] = (np.ndarray,) if cp is None else (np.ndarray, cp.ndarray)


def on_device(a: Any) -> bool:
    return cp is not None and isinstance(a, cp.ndarray)


def to_device(a: Any) -> Any:
    """The device array for `a`: a host array is copied over (C order kept); a C-contiguous
    device array is returned as is, so kernels update it in place."""
    return cp.ascontiguousarray(cp.asarray(a))


def like(result: Any, template: Any) -> Any:
    """`result` (a device array) where `template` lives: unchanged for a device template,
    copied back to a numpy array for a host one."""
    return result if on_device(template) else cp.asnumpy(result)


def store(target: Any, result: Any) -> None:
    """After an in-place kernel ran on `result` (the device copy of `target`, or `target`
    itself): copy it back into a host `target`."""
    if not on_device(target):
        result.get(out=target)


def threads_for(block: int, per_thread: int = 1) -> int:
    """Threads of a CUDA block that walks one quantization block: a power of two in [32, 256]
    covering `block` values at `per_thread` each."""
    t = 32
    while t < 256 and t * per_thread < block:
        t *= 2
    return t


@functools.cache
def raw_kernel(source: str, name: str) -> Any:
    """Compiled once per process. No fast-math: IEEE division and no denormal flushing, so
    results can match the numpy oracle bit for bit where the kernels ask for it (__fmul_rn /
    __fadd_rn keep the compiler from contracting a multiply and an add into one FMA)."""
    return cp.RawKernel(source, name)


def launch_1d(kernel: Any, n: int, args: tuple, threads: int = 256) -> None:
    """One thread per element, `n` >= 1."""
    kernel(((n + threads - 1) // threads,), (threads,), args)


def set_memory_limit_mib(mib: int) -> None:
    """Cap what CuPy's device memory pool may hold (a hardware profile's `memory_cap_mib`): on
    a GPU shared with clinical software, a larger model fails with MemoryError instead of
    starving the other users; 0 lifts the cap."""
    if cp is None:
        raise RuntimeError("cupy not installed")
    cp.get_default_memory_pool().set_limit(size=int(mib) << 20)

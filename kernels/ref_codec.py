"""Plain-numpy update codec kernels: the oracle for the fused cpu/gpu versions.

An update (local minus global parameters, float32) travels as int8 codes with one float32 scale
per block of `block` values: scale = max|x| / 127 over the block, code = floor(x / scale + u)
with u uniform in [0, 1) — stochastic rounding, so E[code * scale] = x and the error of a
FedAvg over many sites averages out instead of adding up. u comes from a counter-based
generator (splitmix64 of seed and element index, top 24 bits), so every backend draws the same
numbers for the same (seed, index) without reading a random array, and an update quantized in
pieces (`offset`) equals the update quantized whole. All arithmetic is float32, in a fixed
order, so the backends agree bit for bit.

Top-k keeps the k values of largest magnitude; ties at the threshold go to the lowest indices.
Indices come back ascending (they compress well as deltas and scatter in order).
"""

from __future__ import annotations

import numpy as np

MAX_CODE = 127  # symmetric: -127..127, so -x codes as -code
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_POW_M24 = np.float32(2.0 ** -24)


def check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) \
            or not 1 <= block <= 1 << 20:
        raise ValueError(f"block must be an integer in [1, 2**20], got {block!r}")


def check_seed(seed: int, offset: int) -> None:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < 1 << 63:
            raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")


def check_vector(name: str, a: np.ndarray, dtype: type, *, writable: bool = False,
                 types: tuple[type, ...] = (np.ndarray,)) -> None:
    """A 1-D C-contiguous array of `dtype`; `types` lets the gpu backend pass device arrays."""
    if not isinstance(a, types) or a.dtype != dtype or a.ndim != 1:
        raise TypeError(f"{name} must be a 1-D {np.dtype(dtype).name} array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not getattr(a.flags, "writeable", True):  # device arrays are always
        raise ValueError(f"{name} must be writable")


def n_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def check_codes(q: np.ndarray, scales: np.ndarray, block: int,
                types: tuple[type, ...] = (np.ndarray,)) -> None:
    check_vector("q", q, np.int8, types=types)
    check_vector("scales", scales, np.float32, types=types)
    check_block(block)
    if scales.size != n_blocks(q.size, block):
        raise ValueError(f"{q.size} codes in blocks of {block} need "
                         f"{n_blocks(q.size, block)} scales, got {scales.size}")


def check_accumulate(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                     types: tuple[type, ...] = (np.ndarray,)) -> None:
    check_vector("acc", acc, np.float32, writable=True, types=types)
    check_codes(q, scales, block, types)
    if acc.shape != q.shape:
        raise ValueError(f"acc and q differ in shape: {acc.shape} vs {q.shape}")


def check_many(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
               weights: np.ndarray, types: tuple[type, ...] = (np.ndarray,)) -> None:
    """acc [n]; q [s, n] int8 and scales [s, ceil(n / block)] float32, C-contiguous;
    weights [s] float32."""
    check_vector("acc", acc, np.float32, writable=True, types=types)
    check_block(block)
    check_vector("weights", weights, np.float32, types=types)
    for name, a, dtype, width in (("q", q, np.int8, acc.size),
                                  ("scales", scales, np.float32, n_blocks(acc.size, block))):
        if not isinstance(a, types) or a.dtype != dtype or a.ndim != 2:
            raise TypeError(f"{name} must be a 2-D {np.dtype(dtype).name} array [sites, "
                            f"{width}], got {getattr(a, 'dtype', type(a).__name__)} "
                            f"{getattr(a, 'shape', '')}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if a.shape != (weights.size, width):
            raise ValueError(f"{name} has shape {a.shape}, expected ({weights.size}, {width})")


def check_scatter(acc: np.ndarray, idx: np.ndarray, q: np.ndarray, scales: np.ndarray,
                  block: int, types: tuple[type, ...] = (np.ndarray,)) -> None:
    check_vector("acc", acc, np.float32, writable=True, types=types)
    check_vector("idx", idx, np.int64, types=types)
    check_codes(q, scales, block, types)
    if idx.size != q.size:
        raise ValueError(f"{idx.size} indices for {q.size} codes")
    # bool() of a device array's reduction syncs and reads back one value; numpy dispatches
    # np.diff / np.any to the array's own module (__array_function__).
    if idx.size and (bool(idx[0] < 0) or bool(idx[-1] >= acc.size)
                     or bool(np.any(np.diff(idx) <= 0))):
        raise ValueError("indices must be ascending, unique and inside the vector")


def check_topk(v: np.ndarray, k: int, types: tuple[type, ...] = (np.ndarray,)) -> None:
    check_vector("v", v, np.float32, types=types)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= v.size:
        raise ValueError(f"k must be an integer in [0, {v.size}], got {k!r}")


def uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """u in [0, 1) (float32, multiples of 2**-24) for each element index: splitmix64."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (index.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * _TWO_POW_M24


def block_scales(x: np.ndarray, block: int) -> np.ndarray:
    """max|x| / 127 per block (float32); 0 for an all-zero block."""
    nb = n_blocks(x.size, block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:x.size] = np.abs(x)
    return (padded.reshape(nb, block).max(axis=1) / np.float32(MAX_CODE)).astype(np.float32)


def quantize_int8(x: np.ndarray, block: int, seed: int, offset: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [n], scales float32 [ceil(n / block)]); element i draws u(seed, offset + i).

    Raises ValueError on NaN or infinity (they have no code)."""
    check_vector("x", x, np.float32)
    check_block(block)
    check_seed(seed, offset)
    if not np.all(np.isfinite(x)):
        raise ValueError("update contains NaN or infinity")
    scales = block_scales(x, block)
    per = np.repeat(scales, block)[:x.size]
    safe = np.where(per > 0, per, np.float32(1.0))
    u = uniform(seed, np.arange(offset, offset + x.size, dtype=np.uint64))
    v = np.floor(x / safe + u)
    q = np.clip(v, -MAX_CODE, MAX_CODE)
    q[per == 0] = 0
    return q.astype(np.int8), scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    check_codes(q, scales, block)
    return q.astype(np.float32) * np.repeat(scales, block)[:q.size]


def dequantize_accumulate(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                          weight: float) -> None:
    """In place acc += weight * (q * scale): the coordinator's fused FedAvg step."""
    check_accumulate(acc, q, scales, block)
    acc += np.float32(weight) * dequantize_int8(q, scales, block)


def dequantize_accumulate_many(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                               weights: np.ndarray) -> None:
    """In place acc += sum over sites s of weights[s] * (q[s] * scale): several sites' updates
    of the same parameters in one pass over the sum. Sites are added in order, so the result
    equals one `dequantize_accumulate` per site, bit for bit."""
    check_many(acc, q, scales, block, weights)
    for s in range(weights.size):
        dequantize_accumulate(acc, q[s], scales[s], block, float(weights[s]))


def topk_indices(v: np.ndarray, k: int) -> np.ndarray:
    """Ascending int64 indices of the k largest |v| (ties at the threshold: lowest index)."""
    check_topk(v, k)
    if not np.all(np.isfinite(v)):
        raise ValueError("update contains NaN or infinity")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    a = np.abs(v)
    threshold = np.partition(a, v.size - k)[v.size - k]
    above = np.flatnonzero(a > threshold)
    at = np.flatnonzero(a == threshold)[:k - above.size]
    return np.sort(np.concatenate([above, at])).astype(np.int64)


def scatter_dequantize_accumulate(acc: np.ndarray, idx: np.ndarray, q: np.ndarray,
                                  scales: np.ndarray, block: int, weight: float) -> None:
    """In place acc[idx] += weight * (q * scale) for a sparse (top-k) update; idx ascending
    and unique (as `topk_indices` gives), checked."""
    check_scatter(acc, idx, q, scales, block)
    acc[idx] += np.float32(weight) * dequantize_int8(q, scales, block)

"""Update codec: a site's update (local minus global parameters) to wire bytes and back.

Pure functions over arrays (no I/O), so they test without a broker. The packed layout, before
zstd, is little-endian and depends only on the manifest's codec fields:

    [indices: k x uint32, as gaps from the previous index]   only when top-k (k < n)
    int8:  [scales: ceil(m / block) x float32] [codes: m x int8]      m = k or n
    none:  [values: m x float32]

The receiver computes the exact packed size from those fields before decompressing, so zstd
never inflates more than that (a forged frame cannot make it allocate more), and every field is
checked before any value reaches the accumulator. With top-k, what was not sent (and the
quantization error of what was) stays with the site as a residual that is added to the next
update: error feedback, so nothing is lost, only delayed.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import zstandard

from agent.config import CompressionSpec
from agent.errors import ProtocolError

CODEC_VERSION = 1
_MAX_SCALE = np.float32(np.finfo(np.float32).max / 128)  # 127 * scale stays finite


@dataclass(frozen=True)
class Encoded:
    body: bytes
    meta: dict[str, Any]  # goes into the manifest: how to decode `body`
    residual: np.ndarray | None  # what to add to the next update (top-k only)
    raw_bytes: int  # the float32 size of the update, for the compression ratio


def kept_count(n: int, spec: CompressionSpec) -> int:
    """How many values a top-k update keeps (all when topk_fraction is 1)."""
    if spec.topk_fraction >= 1.0:
        return n
    return max(1, min(n, math.ceil(spec.topk_fraction * n)))


def rounding_seed(federation: str, site: str, rnd: int) -> int:
    """A stochastic-rounding seed per site and round: reproducible, distinct across sites."""
    digest = hashlib.sha256(f"{federation}/{site}/{rnd}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def encode_update(delta: np.ndarray, spec: CompressionSpec, *, seed: int, kernels: ModuleType,
                  residual: np.ndarray | None = None) -> Encoded:
    """Encode float32 `delta` (plus `residual`, when top-k keeps one) as `spec` says."""
    delta = np.ascontiguousarray(delta, dtype=np.float32)
    n = delta.size
    k = kept_count(n, spec)
    packed = bytearray(packed_size(n, k, spec.quantize, spec.block))
    pos = 0

    def section(dtype: str, count: int) -> np.ndarray:  # a view into `packed`, filled once
        nonlocal pos
        view = np.frombuffer(packed, dtype=dtype, count=count, offset=pos)
        pos += view.nbytes
        return view

    v, idx, values = delta, None, delta
    if k < n:
        v = delta + residual if residual is not None else delta.copy()  # becomes the residual
        idx = kernels.topk_indices(v, k)
        section("<u4", k)[:] = np.diff(idx, prepend=0)
        values = np.ascontiguousarray(v[idx])
    if spec.quantize == "int8":
        q, scales = kernels.quantize_int8(values, spec.block, seed)
        section("<f4", scales.size)[:] = scales
        section("i1", k)[:] = q
        sent = kernels.dequantize_int8(q, scales, spec.block) if idx is not None else None
    else:
        section("<f4", k)[:] = values
        sent = values
    new_residual = None
    if idx is not None:
        v[idx] -= sent  # what was not sent, and the rounding error of what was
        new_residual = v
    body = zstandard.ZstdCompressor(level=spec.zstd_level).compress(packed)
    meta = {"codec": CODEC_VERSION, "quantize": spec.quantize, "n": n, "k": k,
            "block": spec.block, "seed": seed}
    return Encoded(body=body, meta=meta, residual=new_residual, raw_bytes=4 * n)


def packed_size(n: int, k: int, quantize: str, block: int) -> int:
    size = 4 * k if k < n else 0
    if quantize == "int8":
        return size + 4 * -(-k // block) + k
    return size + 4 * k


def _inflate(body: bytes, expected: int) -> bytes:
    """At most expected + 1 bytes out of one zstd frame. (`decompress(max_output_size=)`
    trusts a content size written in the frame header: a forged header could make it
    allocate gigabytes.)"""
    try:
        size = zstandard.frame_content_size(body)
        if size not in (-1, expected):
            raise ProtocolError("bad_update_size", f"frame declares {size} bytes, "
                                f"expected {expected}")
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            return reader.read(expected + 1)
    except zstandard.ZstdError:
        raise ProtocolError("bad_update", "not a zstd frame") from None


def _fields(meta: dict[str, Any], n: int, spec: CompressionSpec) -> tuple[int, str, int]:
    """(k, quantize, block) after checking them against the plan's codec and the model."""
    if meta.get("codec") != CODEC_VERSION:
        raise ProtocolError("bad_codec", f"version {meta.get('codec')!r}")
    if meta.get("quantize") != spec.quantize or meta.get("block") != spec.block:
        raise ProtocolError("bad_codec", "settings differ from the plan's")
    if meta.get("n") != n:
        raise ProtocolError("bad_update_size", f"n {meta.get('n')!r}, model has {n}")
    k = meta.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k != kept_count(n, spec):
        raise ProtocolError("bad_codec", f"k {k!r}")
    return k, spec.quantize, spec.block


def accumulate_update(acc: np.ndarray, weight: float, body: bytes, meta: dict[str, Any],
                      spec: CompressionSpec, kernels: ModuleType) -> None:
    """acc += weight * decoded update; ProtocolError (nothing added) on anything malformed."""
    n = acc.size
    k, quantize, block = _fields(meta, n, spec)
    expected = packed_size(n, k, quantize, block)
    packed = _inflate(body, expected)
    if len(packed) != expected:
        raise ProtocolError("bad_update_size", f"{len(packed)} bytes, expected {expected}")
    buf = memoryview(packed)
    idx = None
    pos = 0
    if k < n:
        gaps = np.frombuffer(buf[:4 * k], dtype="<u4").astype(np.int64)
        idx = np.cumsum(gaps)
        pos = 4 * k
        if k and (np.any(gaps[1:] == 0) or idx[-1] >= n):
            raise ProtocolError("bad_update", "indices not ascending inside the model")
    if quantize == "int8":
        nb = -(-k // block)
        scales = np.frombuffer(buf[pos:pos + 4 * nb], dtype="<f4").astype(np.float32,
                                                                          copy=False)
        q = np.frombuffer(buf[pos + 4 * nb:], dtype=np.int8)
        if not (np.all(np.isfinite(scales)) and np.all(scales >= 0)
                and np.all(scales <= _MAX_SCALE)):
            raise ProtocolError("non_finite_update")
        if idx is None:
            kernels.dequantize_accumulate(acc, q, scales, block, float(weight))
        else:
            kernels.scatter_dequantize_accumulate(acc, idx, q, scales, block, float(weight))
        return
    values = np.frombuffer(buf[pos:], dtype="<f4").astype(np.float32, copy=False)  # a view
    if not np.all(np.isfinite(values)):
        raise ProtocolError("non_finite_update")
    if idx is None:
        kernels.weighted_accumulate(acc, values, float(weight))
    else:
        acc[idx] += np.float32(weight) * values

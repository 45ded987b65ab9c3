"""Update codec: a site's update (local minus global parameters) to wire bytes and back.

Pure functions over arrays (no I/O), so they test without a broker. An update is m entries
(m = k with top-k, else n), cut into frames of `frame_entries(block)` entries (65,536, a
multiple of the quantization block). The body is the frames in order, each a little-endian
uint32 length and then one zstd frame holding that frame's packed entries:

    [indices: e x uint32, gaps from the previous entry's index]   only when top-k (k < n)
    int8:  [scales: ceil(e / block) x float32] [codes: e x int8]
    none:  [values: e x float32]

Frames are what make the coordinator's memory independent of how many sites upload at once:
`UpdateStream` decodes each frame as soon as its bytes have arrived and adds it to the running
sum, so a site's update is never held whole (at most one frame, a few hundred KiB). The receiver
knows each frame's exact packed size from the manifest's fields before inflating it, so zstd
never inflates more than that, and every field is checked before the frame reaches the sum.
A frame is all or nothing; an update cut off or refused part way has added whole frames only, up
to its `watermark` (every parameter below it is settled), and the accumulator weighs it for
those parameters alone (`agent.federation.aggregate`).

With top-k, what was not sent (and the quantization error of what was) stays with the site as a
residual that is added to the next update: error feedback, so nothing is lost, only delayed.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import zstandard

from agent.config import CompressionSpec
from agent.errors import ProtocolError

CODEC_VERSION = 2  # 2: framed bodies (1: one zstd frame)
FRAME_ENTRIES = 1 << 16
_MAX_WINDOW = 1 << 23  # zstd window a sender may ask of us (ours use 2 MiB at level <= 10)
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


def frame_entries(block: int) -> int:
    """Entries per frame: 65,536 rounded up to whole quantization blocks."""
    return block * max(1, -(-FRAME_ENTRIES // block))


def packed_size(e: int, topk: bool, quantize: str, block: int) -> int:
    """Bytes of one frame's packed entries, before zstd."""
    size = 4 * e if topk else 0
    if quantize == "int8":
        return size + 4 * -(-e // block) + e
    return size + 4 * e


def frame_bound(e: int, topk: bool, quantize: str, block: int) -> int:
    """Largest compressed frame accepted for e entries: zstd's worst case for the packed size
    (incompressible data grows by a few bytes per 128 KiB block plus a header)."""
    size = packed_size(e, topk, quantize, block)
    return size + size // 128 + 1024


def max_body_len(n: int, spec: CompressionSpec) -> int:
    """The largest update body an honest site can send for n parameters (every frame
    incompressible): the receiver's size limit, checked before anything is allocated."""
    k = kept_count(n, spec)
    per = frame_entries(spec.block)
    return sum(4 + frame_bound(min(per, k - a), k < n, spec.quantize, spec.block)
               for a in range(0, k, per))


def encode_update(delta: np.ndarray, spec: CompressionSpec, *, seed: int, kernels: ModuleType,
                  residual: np.ndarray | None = None) -> Encoded:
    """Encode float32 `delta` (plus `residual`, when top-k keeps one) as `spec` says."""
    delta = np.ascontiguousarray(delta, dtype=np.float32)
    n = delta.size
    k = kept_count(n, spec)
    v, idx, values = delta, None, delta
    if k < n:
        v = delta + residual if residual is not None else delta.copy()  # becomes the residual
        idx = kernels.topk_indices(v, k)
        values = np.ascontiguousarray(v[idx])
    q = scales = sent = None
    if spec.quantize == "int8":
        q, scales = kernels.quantize_int8(values, spec.block, seed)
        sent = kernels.dequantize_int8(q, scales, spec.block) if idx is not None else None
    new_residual = None
    if idx is not None:
        v[idx] -= sent if sent is not None else values  # what was not sent, and rounding error
        new_residual = v
    gaps = np.diff(idx, prepend=0).astype("<u4") if idx is not None else None
    body = bytearray()
    cctx = zstandard.ZstdCompressor(level=spec.zstd_level)
    per = frame_entries(spec.block)
    for a in range(0, k, per):
        b = min(k, a + per)
        parts = [] if gaps is None else [gaps[a:b]]
        if q is not None:
            parts += [scales[a // spec.block:-(-b // spec.block)].astype("<f4", copy=False),
                      q[a:b]]
        else:
            parts.append(values[a:b].astype("<f4", copy=False))
        frame = cctx.compress(b"".join(memoryview(p).cast("B") for p in parts))
        body += len(frame).to_bytes(4, "little")
        body += frame
    meta = {"codec": CODEC_VERSION, "quantize": spec.quantize, "n": n, "k": k,
            "block": spec.block, "frame": per, "seed": seed}
    return Encoded(body=bytes(body), meta=meta, residual=new_residual, raw_bytes=4 * n)


def _inflate(frame: bytes | bytearray, expected: int) -> bytes:
    """At most expected + 1 bytes out of one zstd frame. (`decompress(max_output_size=)`
    trusts a content size written in the frame header: a forged header could make it
    allocate gigabytes.)"""
    try:
        size = zstandard.frame_content_size(frame)
        if size not in (-1, expected):
            raise ProtocolError("bad_update_size", f"frame declares {size} bytes, "
                                f"expected {expected}")
        dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        with dctx.stream_reader(io.BytesIO(frame)) as reader:
            return reader.read(expected + 1)
    except zstandard.ZstdError:
        raise ProtocolError("bad_update", "not a zstd frame") from None


def _fields(meta: dict[str, Any], n: int, spec: CompressionSpec) -> int:
    """k, after checking the manifest's codec fields against the plan and the model."""
    if meta.get("codec") != CODEC_VERSION:
        raise ProtocolError("bad_codec", f"version {meta.get('codec')!r}")
    if meta.get("quantize") != spec.quantize or meta.get("block") != spec.block:
        raise ProtocolError("bad_codec", "settings differ from the plan's")
    if meta.get("frame") != frame_entries(spec.block):
        raise ProtocolError("bad_codec", f"frame {meta.get('frame')!r}")
    if meta.get("n") != n:
        raise ProtocolError("bad_update_size", f"n {meta.get('n')!r}, model has {n}")
    k = meta.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k != kept_count(n, spec):
        raise ProtocolError("bad_codec", f"k {k!r}")
    return k


class FrameSink(Protocol):
    """Where a decoded, checked update goes, frame by frame: the strategy's side of the seam
    (FedAvg sums it with its weight as it arrives; a robust rule keeps it to compare).

    Each call hands over one whole, checked frame: `dense_int8`/`dense_f32` cover parameters
    [a, a + len) (frame number `f`); `sparse_int8`/`sparse_f32` name ascending indices.
    `ended` is called once the stream takes no more bytes (complete, refused or abandoned).
    """

    n: int

    def dense_int8(self, f: int, a: int, q: np.ndarray, scales: np.ndarray, block: int
                   ) -> None: ...

    def dense_f32(self, a: int, values: np.ndarray) -> None: ...

    def sparse_int8(self, idx: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int
                    ) -> None: ...

    def sparse_f32(self, idx: np.ndarray, values: np.ndarray) -> None: ...

    def ended(self) -> None: ...


class UpdateStream:
    """One site's update, decoded and checked frame by frame as its bytes arrive, each whole
    frame handed to a `FrameSink` (the strategy's). Nothing here knows how updates combine.

    `feed` takes the body's bytes in order, in pieces of any size (the transport's chunks);
    `finish` checks that the body ended exactly after its last frame. With `body_len` (the
    manifest's), frame lengths that do not add up to it are refused before the frame is handed
    on, so a body that is whole but malformed delivers nothing. After any ProtocolError the sink
    holds whole frames only, up to `watermark`; the stream refuses further bytes.
    """

    def __init__(self, sink: FrameSink, meta: dict[str, Any], spec: CompressionSpec,
                 body_len: int | None = None) -> None:
        self.sink = sink
        self.n = sink.n
        self.k = _fields(meta, self.n, spec)
        self.quantize, self.block = spec.quantize, spec.block
        self.per = frame_entries(spec.block)
        self.frames = -(-self.k // self.per)
        self.frame = 0  # frames handed on so far
        self.watermark = 0  # every parameter below it is settled
        self.failed: ProtocolError | None = None
        self.body_len = body_len
        self.accepted = False  # finish() found the body whole and well formed
        self._pending = bytearray()
        self._consumed = 0  # body bytes before _pending
        self._last_index = -1

    @property
    def topk(self) -> bool:
        return self.k < self.n

    @property
    def complete(self) -> bool:
        return self.frame == self.frames

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            self._pending += data
            pos = 0
            while len(self._pending) - pos >= 4:
                if self.complete:
                    raise ProtocolError("bad_update_size", "bytes after the last frame")
                e = min(self.per, self.k - self.frame * self.per)
                length = int.from_bytes(self._pending[pos:pos + 4], "little")
                if not 0 < length <= frame_bound(e, self.topk, self.quantize, self.block):
                    raise ProtocolError("bad_update", f"frame {self.frame} claims {length} bytes")
                end = self._consumed + pos + 4 + length
                last = self.frame == self.frames - 1
                if self.body_len is not None and (end > self.body_len
                                                  or (end == self.body_len) != last):
                    raise ProtocolError("bad_update_size", f"frame {self.frame} ends at {end}, "
                                        f"body is {self.body_len} bytes")
                if len(self._pending) - pos - 4 < length:
                    break
                self._add_frame(self._pending[pos + 4:pos + 4 + length], e)
                pos += 4 + length
            del self._pending[:pos]
            self._consumed += pos
        except ProtocolError as exc:
            self.failed = exc
            self._pending = bytearray()
            self._ended()
            raise

    def finish(self) -> None:
        if self.failed is not None:
            raise self.failed
        if not self.complete or self._pending:
            self.failed = ProtocolError("bad_update_size", f"body ended after {self.frame} of "
                                        f"{self.frames} frames")
            self._ended()
            raise self.failed
        self.accepted = True
        self._ended()

    @property
    def live(self) -> bool:
        """Still expected to deliver frames."""
        return self.failed is None and not self.complete

    def abandon(self, exc: ProtocolError) -> None:
        """Take no more bytes (round closed, or replaced by a newer upload of the site)."""
        if self.failed is None:
            self.failed = exc
            self._pending = bytearray()
            self._ended()

    def _ended(self) -> None:
        self.sink.ended()

    def _add_frame(self, frame: bytes | bytearray, e: int) -> None:
        expected = packed_size(e, self.topk, self.quantize, self.block)
        packed = _inflate(frame, expected)
        if len(packed) != expected:
            raise ProtocolError("bad_update_size", f"frame {self.frame}: {len(packed)} bytes, "
                                f"expected {expected}")
        buf = memoryview(packed)
        pos, idx = 0, None
        if self.topk:
            gaps = np.frombuffer(buf[:4 * e], dtype="<u4").astype(np.int64)
            if np.any(gaps[1 if self._last_index < 0 else 0:] == 0):
                raise ProtocolError("bad_update", "indices not ascending")
            idx = self._last_index + np.cumsum(gaps) + (1 if self._last_index < 0 else 0)
            if idx[-1] >= self.n:
                raise ProtocolError("bad_update", "index beyond the model")
            pos = 4 * e
        a = self.frame * self.per
        if self.quantize == "int8":
            nb = -(-e // self.block)
            scales = np.frombuffer(buf[pos:pos + 4 * nb], dtype="<f4").astype(np.float32,
                                                                              copy=False)
            q = np.frombuffer(buf[pos + 4 * nb:], dtype=np.int8)
            if not (np.all(np.isfinite(scales)) and np.all(scales >= 0)
                    and np.all(scales <= _MAX_SCALE)):
                raise ProtocolError("non_finite_update")
        else:
            values = np.frombuffer(buf[pos:], dtype="<f4").astype(np.float32, copy=False)
            if not np.all(np.isfinite(values)):
                raise ProtocolError("non_finite_update")
        # Checked: from here the frame counts, whatever the sink does with it.
        f = self.frame
        self.frame += 1
        if idx is not None:
            self._last_index = int(idx[-1])
        self.watermark = self.n if self.complete else (
            self._last_index + 1 if idx is not None else a + e)
        if self.quantize == "int8" and idx is None:
            self.sink.dense_int8(f, a, q, scales, self.block)
        elif self.quantize == "int8":
            self.sink.sparse_int8(idx, q, scales, self.block)
        elif idx is None:
            self.sink.dense_f32(a, values)
        else:
            self.sink.sparse_f32(idx, values)

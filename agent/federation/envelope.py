"""The versioned wire envelope: magic, protocol version, a small JSON header, a binary body.

Pure bytes in, bytes out: no MQTT, no clock, no logging. JSON headers are never executable
(no pickle anywhere on the wire) and every size is checked against a cap before anything is
allocated, so a garbled or hostile payload costs a ProtocolError, never memory or a crash.

Layout of every payload::

    b"FSLO" | major u8 | minor u8 | header_len u32 big-endian | header (UTF-8 JSON) | body
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ProtocolError

MAGIC = b"FSLO"
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
_PREFIX = struct.Struct(">4sBBI")

MAX_HEADER_BYTES = 256 * 1024  # a manifest of a 10 M-parameter model lists ~10 k digests
CHUNK_SIZE = 1024 * 1024  # PROTOCOL.md: chunks of at most 1 MiB
MAX_CHUNK_BYTES = CHUNK_SIZE
MAX_ROUND = 10**9  # in headers and topics alike
MAX_CHUNK_INDEX = 10**7
# JSON numbers in a header: an integer of more digits than any field needs (int64 has 19) or a
# float that overflows to infinity would make a later float()/math.isfinite() raise or mislead.
_MAX_INT_DIGITS = 20


class MessageKind(str, enum.Enum):
    MANIFEST = "manifest"
    CHUNK = "chunk"
    RESEND = "resend"


class BodyKind(str, enum.Enum):
    """What a manifest's body is; the role decides what it may accept."""

    STATS_TASK = "stats_task"  # coordinator -> sites: send your column moments
    STATS = "stats"  # site -> coordinator: float64 moments vector
    TASK = "task"  # coordinator -> sites: global parameters + round settings
    UPDATE = "update"  # site -> coordinator: local minus global parameters
    EVALUATE = "evaluate"  # coordinator -> sites: final model, evaluate only
    EVALUATION = "evaluation"  # site -> coordinator: metrics only, empty body
    FINISHED = "finished"  # coordinator -> sites (control topic): the federation is over
    DECLINED = "declined"  # site -> coordinator: takes no part in this task, and why (no data)
    UNMASK = "unmask"  # coordinator -> sites: every masked update of the epoch is in
    REVEAL = "reveal"  # site -> coordinator: the epoch's self-mask seed, opening only the sum
    MODEL = "model"  # coordinator -> sites: the final model as ONNX, sent before FINISHED


@dataclass(frozen=True)
class Envelope:
    header: dict[str, Any]
    body: bytes = b""

    @property
    def kind(self) -> MessageKind:
        return MessageKind(self.header["kind"])


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{len(raw)} bytes > {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, PROTOCOL_MAJOR, PROTOCOL_MINOR, len(raw)) + raw + body


def decode(payload: bytes, *, max_body: int) -> Envelope:
    """Parse one payload; every failure is a ProtocolError with a short reason code."""
    if len(payload) < _PREFIX.size:
        raise ProtocolError("too_short", f"{len(payload)} bytes")
    magic, major, _minor, header_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError("bad_magic")
    if major != PROTOCOL_MAJOR:
        raise ProtocolError("unsupported_version", f"major {major}, this agent speaks "
                                                   f"{PROTOCOL_MAJOR}")
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"declared {header_len} bytes")
    end = _PREFIX.size + header_len
    if end > len(payload):
        raise ProtocolError("truncated_header", f"declared {header_len}, have "
                                                f"{len(payload) - _PREFIX.size}")
    body_len = len(payload) - end
    if body_len > max_body:
        raise ProtocolError("body_too_large", f"{body_len} bytes > {max_body}")
    try:
        header = json.loads(payload[_PREFIX.size:end].decode("utf-8"),
                            parse_constant=_reject_constant, parse_int=_bounded_int,
                            parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ProtocolError("bad_header_json") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not an object")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in {k.value for k in MessageKind}:
        raise ProtocolError("unknown_kind", str(kind)[:32])
    return Envelope(header=header, body=bytes(payload[end:]))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite constant {name}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError("integer too long")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError("float out of range")
    return value


# ---------------------------------------------------------------------------- manifests


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Describes one body split into chunks; the receiver checks every chunk against it."""

    federation: str
    round: int
    sender: str
    body_kind: BodyKind
    body_len: int
    chunk_size: int
    chunk_digests: tuple[str, ...]
    body_digest: str
    nonce: str
    created: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_digests)

    def header(self) -> dict[str, Any]:
        return {
            "kind": MessageKind.MANIFEST.value,
            "federation": self.federation,
            "round": self.round,
            "sender": self.sender,
            "body_kind": self.body_kind.value,
            "body_len": self.body_len,
            "chunk_size": self.chunk_size,
            "chunk_digests": list(self.chunk_digests),
            "body_digest": self.body_digest,
            "nonce": self.nonce,
            "created": self.created,
            "meta": self.meta,
        }

    def chunk_span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.body_len)


def make_manifest(*, federation: str, round: int, sender: str, body_kind: BodyKind,
                  body: bytes, created: float, meta: dict[str, Any] | None = None,
                  chunk_size: int = CHUNK_SIZE) -> Manifest:
    view = memoryview(body)
    digests = tuple(sha256_hex(view[i:i + chunk_size]) for i in range(0, len(body), chunk_size))
    return Manifest(federation=federation, round=round, sender=sender, body_kind=body_kind,
                    body_len=len(body), chunk_size=chunk_size, chunk_digests=digests,
                    body_digest=sha256_hex(view), nonce=os.urandom(16).hex(), created=created,
                    meta=dict(meta or {}))


def iter_chunks(manifest: Manifest, body: bytes) -> Iterator[tuple[int, bytes]]:
    view = memoryview(body)
    for i in range(manifest.n_chunks):
        a, b = manifest.chunk_span(i)
        yield i, encode(chunk_header(manifest, i), bytes(view[a:b]))


def chunk_header(manifest: Manifest, index: int) -> dict[str, Any]:
    return {"kind": MessageKind.CHUNK.value, "federation": manifest.federation,
            "round": manifest.round, "sender": manifest.sender,
            "body_digest": manifest.body_digest, "nonce": manifest.nonce, "index": index}


WHOLE_BODY = "0" * 64  # resend request for a whole body whose manifest never arrived


def resend_header(*, federation: str, round: int, sender: str, body_digest: str,
                  missing: list[int]) -> dict[str, Any]:
    return {"kind": MessageKind.RESEND.value, "federation": federation, "round": round,
            "sender": sender, "body_digest": body_digest, "missing": missing}


_HEX64 = frozenset("0123456789abcdef")


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX64


def _int_field(h: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = h.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError("bad_field", f"{name} must be an integer in [{lo}, {hi}]")
    return v


def _str_field(h: dict[str, Any], name: str, max_len: int = 64) -> str:
    v = h.get(name)
    if not isinstance(v, str) or not 0 < len(v) <= max_len:
        raise ProtocolError("bad_field", f"{name} must be a string of 1..{max_len} chars")
    return v


def parse_manifest(h: dict[str, Any], *, max_body: int) -> Manifest:
    """Validate a manifest header; the declared size is checked before anything is allocated."""
    try:
        body_kind = BodyKind(h.get("body_kind"))
    except ValueError:
        raise ProtocolError("bad_field", "unknown body_kind") from None
    body_len = _int_field(h, "body_len", 0, max_body)
    chunk_size = _int_field(h, "chunk_size", 1, MAX_CHUNK_BYTES)
    digests = h.get("chunk_digests")
    expected_chunks = math.ceil(body_len / chunk_size)
    if not isinstance(digests, list) or len(digests) != expected_chunks:
        raise ProtocolError("bad_field", "chunk_digests does not match body_len/chunk_size")
    if not all(_is_digest(d) for d in digests) or not _is_digest(h.get("body_digest")):
        raise ProtocolError("bad_field", "digests must be sha256 hex")
    created = h.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise ProtocolError("bad_field", "created must be a number")
    meta = h.get("meta", {})
    if not isinstance(meta, dict):
        raise ProtocolError("bad_field", "meta must be an object")
    return Manifest(
        federation=_str_field(h, "federation"), round=_int_field(h, "round", 0, MAX_ROUND),
        sender=_str_field(h, "sender"), body_kind=body_kind, body_len=body_len,
        chunk_size=chunk_size, chunk_digests=tuple(digests), body_digest=h["body_digest"],
        nonce=_str_field(h, "nonce", 128), created=float(created), meta=meta)


@dataclass(frozen=True)
class ChunkRef:
    """Which body a chunk belongs to. The manifest's nonce is part of the key, so a round the
    coordinator re-opens after a restart (same parameters, new manifest) is a new body."""

    federation: str
    round: int
    sender: str
    body_digest: str
    nonce: str
    index: int


def parse_chunk_header(h: dict[str, Any]) -> ChunkRef:
    if not _is_digest(h.get("body_digest")):
        raise ProtocolError("bad_field", "body_digest must be sha256 hex")
    return ChunkRef(_str_field(h, "federation"), _int_field(h, "round", 0, MAX_ROUND),
                    _str_field(h, "sender"), h["body_digest"], _str_field(h, "nonce", 128),
                    _int_field(h, "index", 0, MAX_CHUNK_INDEX))


def parse_resend(h: dict[str, Any]) -> tuple[str, int, str, str, list[int]]:
    missing = h.get("missing")
    if (not isinstance(missing, list) or len(missing) > 100_000
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_CHUNK_INDEX
                       for i in missing)):
        raise ProtocolError("bad_field", "missing must be a list of chunk indices")
    if not _is_digest(h.get("body_digest")):
        raise ProtocolError("bad_field", "body_digest must be sha256 hex")
    return (_str_field(h, "federation"), _int_field(h, "round", 0, MAX_ROUND),
            _str_field(h, "sender"), h["body_digest"], missing)

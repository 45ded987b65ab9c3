"""Receiver side of chunked bodies: idempotent, bounded, and able to say what is missing.

Pure logic over manifests and chunk bytes (no MQTT, no clock: `now` is passed in), so the
rules of PROTOCOL.md "Receiving" are unit-tested without a broker. MQTT's QoS 1 may deliver a
chunk twice, before its manifest, or not at all (a queue overflowed, the subscriber joined
late); the reassembler absorbs duplicates, parks early chunks within a byte budget, and lists
missing chunks so the role can ask the sender again instead of trusting broker queues.

A body is either buffered whole (the default) or streamed: given a `Sink` with its manifest,
the reassembler hands each digest-checked chunk to the sink in order as soon as it can, keeps
only the few chunks that arrived ahead of a gap (within a byte budget shared by all bodies;
beyond it a chunk is dropped and asked for again), and checks the body digest incrementally.
The coordinator streams model updates this way, so its memory does not grow with the number
of sites uploading at once. A sink that refuses its bytes ends the body: later chunks of it are
ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import ProtocolError
from agent.federation.envelope import ChunkRef, Manifest, sha256_hex

Key = tuple[str, int, str, str]  # (sender, round, body_digest, manifest nonce)

MAX_AHEAD_CHUNKS = 4  # per streamed body: chunks kept while an earlier one is missing


class Sink(Protocol):
    """Takes a streamed body's bytes in order; raises ProtocolError to refuse them."""

    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


@dataclass
class _Pending:
    manifest: Manifest
    buffer: bytearray | None  # None when streamed
    have: set[int] = field(default_factory=set)
    last_progress: float = 0.0
    last_request: float = 0.0
    requests: int = 0  # asked again since its last progress (each wait doubles)
    sink: Sink | None = None
    next_index: int = 0  # streamed: chunks before it went to the sink
    ahead: dict[int, bytes] = field(default_factory=dict)
    hasher: Any = None


@dataclass(frozen=True)
class Completed:
    manifest: Manifest
    body: bytes | bytearray  # empty when the body was streamed to a sink


class Reassembler:
    def __init__(self, *, max_pending: int = 64, max_orphan_bytes: int = 64 << 20,
                 max_ahead_bytes: int = 16 << 20) -> None:
        self.max_pending = max_pending
        self.max_orphan_bytes = max_orphan_bytes
        self.max_ahead_bytes = max_ahead_bytes
        self._pending: dict[Key, _Pending] = {}
        self._done: set[Key] = set()
        self._orphans: dict[Key, dict[int, bytes]] = {}
        self._orphan_bytes = 0
        self._ahead_bytes = 0
        self._last_any_progress = 0.0  # a chunk of any body: the pipe is still delivering

    @staticmethod
    def key_of(m: Manifest) -> Key:
        return (m.sender, m.round, m.body_digest, m.nonce)

    def pending_count(self) -> int:
        return len(self._pending)

    def known(self, m: Manifest) -> bool:
        """Whether this manifest's body is being collected or was finished or refused."""
        key = self.key_of(m)
        return key in self._done or key in self._pending

    def has_body_from(self, sender: str, rnd: int) -> bool:
        """Whether any body from this sender for this round is known (arriving or done)."""
        return any(k[0] == sender and k[1] == rnd for k in (*self._pending, *self._done))

    def refuse(self, m: Manifest) -> None:
        """Ignore this body from now on (its manifest was refused): no chunk of it is kept."""
        key = self.key_of(m)
        self._done.add(key)
        self._orphan_bytes -= sum(len(d) for d in self._orphans.pop(key, {}).values())

    def add_manifest(self, m: Manifest, now: float, sink: Sink | None = None
                     ) -> Completed | None:
        """Start collecting the body a manifest announces (a repeated manifest is a no-op);
        with a sink, stream it there instead of buffering it."""
        key = self.key_of(m)
        if key in self._done or key in self._pending:
            return None
        if len(self._pending) >= self.max_pending:
            raise ProtocolError("too_many_pending", f"{len(self._pending)} partial bodies")
        if sink is None:
            p = _Pending(manifest=m, buffer=bytearray(m.body_len), last_progress=now)
        else:
            p = _Pending(manifest=m, buffer=None, last_progress=now, sink=sink,
                         hasher=hashlib.sha256())
        self._pending[key] = p
        for index, data in sorted(self._orphans.pop(key, {}).items()):
            self._orphan_bytes -= len(data)
            try:
                self._take(key, p, index, data)
            except ProtocolError:
                if key not in self._pending:
                    raise  # the sink refused the body
                continue  # a bad early chunk is simply asked for again later
        return self._finish_if_complete(key, p)

    def add_chunk(self, ref: ChunkRef, data: bytes, now: float) -> Completed | None:
        key = (ref.sender, ref.round, ref.body_digest, ref.nonce)
        index = ref.index
        if key in self._done:
            return None  # duplicate of a finished body
        p = self._pending.get(key)
        if p is None:
            self._park_orphan(key, index, data)
            return None
        if index in p.have:
            return None
        self._take(key, p, index, data)
        p.last_progress = self._last_any_progress = now
        p.requests = 0
        return self._finish_if_complete(key, p)

    def _take(self, key: Key, p: _Pending, index: int, data: bytes) -> None:
        """Check a chunk, then buffer it or stream it; a sink's refusal ends the body."""
        self._check(p, index, data)
        if index in p.have:
            return  # a duplicate (a resend crossed the first copy)
        if p.sink is None:
            a, b = p.manifest.chunk_span(index)
            p.buffer[a:b] = data
            p.have.add(index)
            return
        try:
            self._stream(p, index, data)
        except ProtocolError:
            self._drop(key, p)
            self._done.add(key)
            raise

    def _stream(self, p: _Pending, index: int, data: bytes) -> None:
        if index != p.next_index:
            if len(p.ahead) < MAX_AHEAD_CHUNKS \
                    and self._ahead_bytes + len(data) <= self.max_ahead_bytes:
                p.ahead[index] = data
                self._ahead_bytes += len(data)
                p.have.add(index)
            return  # else dropped: it is asked for again once the gap is filled
        while True:
            p.sink.feed(data)
            p.hasher.update(data)
            p.have.add(p.next_index)
            p.next_index += 1
            data = p.ahead.pop(p.next_index, None)
            if data is None:
                return
            self._ahead_bytes -= len(data)

    def _drop(self, key: Key, p: _Pending) -> None:
        self._pending.pop(key, None)
        self._ahead_bytes -= sum(len(d) for d in p.ahead.values())
        p.ahead.clear()

    def _park_orphan(self, key: Key, index: int, data: bytes) -> None:
        if self._orphan_bytes + len(data) > self.max_orphan_bytes:
            raise ProtocolError("orphan_budget", "chunk arrived before its manifest and the "
                                                 "early-chunk budget is full")
        slot = self._orphans.setdefault(key, {})
        if index not in slot:
            slot[index] = data
            self._orphan_bytes += len(data)

    @staticmethod
    def _check(p: _Pending, index: int, data: bytes) -> None:
        m = p.manifest
        if index >= m.n_chunks:
            raise ProtocolError("bad_chunk_index", f"{index} >= {m.n_chunks}")
        a, b = m.chunk_span(index)
        if len(data) != b - a:
            raise ProtocolError("bad_chunk_size", f"chunk {index}: {len(data)} != {b - a}")
        if sha256_hex(data) != m.chunk_digests[index]:
            raise ProtocolError("chunk_digest_mismatch", f"chunk {index}")

    def _finish_if_complete(self, key: Key, p: _Pending) -> Completed | None:
        if key not in self._pending:
            return None
        if p.sink is not None:
            if p.next_index < p.manifest.n_chunks:
                return None
            self._drop(key, p)
            self._done.add(key)
            if p.hasher.hexdigest() != p.manifest.body_digest:
                raise ProtocolError("body_digest_mismatch",
                                    "all chunks matched but the body did not")
            p.sink.finish()
            return Completed(manifest=p.manifest, body=b"")
        if len(p.have) < p.manifest.n_chunks:
            return None
        del self._pending[key]
        if sha256_hex(p.buffer) != p.manifest.body_digest:
            raise ProtocolError("body_digest_mismatch", "all chunks matched but the body did not")
        self._done.add(key)
        # The buffer itself, not a copy: nothing else refers to it once it left _pending.
        return Completed(manifest=p.manifest, body=p.buffer)

    def due_requests(self, now: float, after_s: float, *, max_doublings: int = 4
                     ) -> list[tuple[Manifest, list[int]]]:
        """Bodies to ask the sender for again: no chunk of any body for `after_s` (while
        chunks still arrive, the missing ones are queued behind them, at the broker or in a
        busy process, and asking would only add copies to that queue), and each body asked
        at most once per `after_s` x 2^(requests so far), up to 2^`max_doublings`.

        With hundreds of senders the quiet rule is what keeps a slow round from becoming a
        resend storm (every request is answered with whole chunks)."""
        out = []
        if now - self._last_any_progress < after_s:
            return out
        for p in self._pending.values():
            wait = after_s * (1 << min(p.requests, max_doublings))
            if now - p.last_progress >= after_s and now - p.last_request >= wait:
                missing = [i for i in range(p.manifest.n_chunks) if i not in p.have]
                p.last_request = now
                p.requests += 1
                out.append((p.manifest, missing))
        return out

    def forget_rounds_before(self, rnd: int) -> None:
        """Drop partial bodies and orphans of rounds that are over (they can never count)."""
        for key in [k for k in self._pending if k[1] < rnd]:
            self._drop(key, self._pending[key])
        for key in [k for k in self._orphans if k[1] < rnd]:
            self._orphan_bytes -= sum(len(d) for d in self._orphans.pop(key).values())
        self._done = {k for k in self._done if k[1] >= rnd}

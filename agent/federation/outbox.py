"""A site's last reply, kept on disk until the next one: what makes an answer survive a crash.

Before a reply leaves, its manifest (the very header, nonce included), its body and the
error-feedback residual it leaves behind are written here. A site killed mid-upload, or before
it recorded the round as answered, finds the reply at restart and sends the *same* manifest and
body again instead of training anew (also when the coordinator restarted and re-issued the
round's task with the same parameters): the coordinator, which may hold part of the first
upload, asks for the chunks it lacks under that manifest and gets them; the residual is the one
the sent update left, so nothing is counted twice and nothing is lost.

One file, `outbox/reply.bin` (0600): an 8-byte little-endian length, that many bytes of JSON
(run, the task's body digest, the manifest header), the body, then the residual as float32.
It replaces the previous one by rename. It is written through the page cache before the send
(that already survives the process being killed) and fsync'ed after it (`make_durable`), before
the round is recorded as answered, so the fsync stays off the upload's path; a file torn by a
power cut fails the digest check in `get`, and the round is then trained again.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import ProtocolError
from agent.federation import envelope
from agent.federation.envelope import Manifest
from agent.ops.atomic import fsync_dir, write_atomic

log = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")
MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class Reply:
    run: str
    task_digest: str  # body digest of the task it answers
    manifest: Manifest
    body: bytes
    residual: np.ndarray | None  # the residual this reply leaves, to keep once it is sent


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "outbox"
        self.path = self.dir / "reply.bin"
        self._kept: Reply | None = None  # what the file holds, once read or written

    def put(self, reply: Reply) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        residual = b"" if reply.residual is None else reply.residual.astype("<f4").tobytes()
        head = json.dumps({"run": reply.run, "task_digest": reply.task_digest,
                           "manifest": reply.manifest.header(),
                           "residual_bytes": len(residual) if reply.residual is not None
                           else None}).encode()

        def write(fh) -> None:
            fh.write(_LEN.pack(len(head)))
            fh.write(head)
            fh.write(reply.body)
            fh.write(residual)

        self._kept = None
        write_atomic(self.path, write, mode=0o600, fsync=False, sync_dir=False)
        self._kept = reply

    def make_durable(self) -> None:
        """fsync the kept reply and its directory (raises OSError, e.g. disk full)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.dir)

    def get(self, max_body: int) -> Reply | None:
        """The kept reply, or None (none, or unusable: then the round is simply retrained)."""
        if self._kept is not None:
            return self._kept
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s unreadable (%s); a re-sent task will be trained again", self.path,
                        exc)
            return None
        try:
            (n,) = _LEN.unpack_from(raw)
            if n > MAX_HEADER or _LEN.size + n > len(raw):
                raise ValueError("header length beyond the file")
            doc = json.loads(raw[_LEN.size:_LEN.size + n])
            manifest = envelope.parse_manifest(doc["manifest"], max_body=max_body)
            start = _LEN.size + n
            body = raw[start:start + manifest.body_len]
            rest = raw[start + manifest.body_len:]
            if envelope.sha256_hex(body) != manifest.body_digest:
                raise ValueError("body does not match its manifest")
            want = doc["residual_bytes"]
            if len(rest) != (want or 0):
                raise ValueError("residual cut short")
            residual = None if want is None else np.frombuffer(rest, dtype="<f4").astype(
                np.float32)
            self._kept = Reply(str(doc["run"]), str(doc["task_digest"]), manifest, body,
                               residual)
            return self._kept
        except (struct.error, KeyError, TypeError, ValueError, ProtocolError) as exc:
            log.warning("kept reply %s unusable (%s); a re-sent task will be trained again",
                        self.path, exc)
            return None

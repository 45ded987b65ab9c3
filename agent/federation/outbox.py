"""A site's last reply, kept on disk until the next round: what makes an answer survive a crash.

Before a reply leaves, its manifest (the very header, nonce included), its body and the
error-feedback residual it leaves behind are written here. A site killed mid-upload, or before
it recorded the round as answered, finds the reply at restart and sends the *same* manifest and
body again instead of training anew (also when the coordinator restarted and re-issued the
round's task with the same parameters): the coordinator, which may hold part of the first upload,
asks for the chunks it lacks under that manifest and gets them; the residual is the one the
sent update left, so nothing is counted twice and nothing is lost.

Files (all 0600, written atomically; the JSON last, so it only ever names complete files):
`outbox/reply.json` (run, round, the task's body digest, manifest header), `outbox/reply.body`,
`outbox/reply.residual.f32` (only when error feedback is on).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import ProtocolError
from agent.federation import envelope
from agent.federation.envelope import Manifest
from agent.ops.atomic import write_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    run: str
    task_digest: str
    manifest: Manifest
    body: bytes
    residual: np.ndarray | None  # the residual this reply leaves, to keep once it is sent


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "outbox"

    def put(self, reply: Reply) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.dir / "reply.json").unlink(missing_ok=True)  # never names the files below
        write_atomic(self.dir / "reply.body", lambda fh: fh.write(reply.body), mode=0o600)
        residual = self.dir / "reply.residual.f32"
        if reply.residual is not None:
            data = reply.residual.astype("<f4").tobytes()
            write_atomic(residual, lambda fh: fh.write(data), mode=0o600)
        else:
            residual.unlink(missing_ok=True)
        write_json_atomic(self.dir / "reply.json", {
            "run": reply.run, "task_digest": reply.task_digest,
            "manifest": reply.manifest.header(), "residual": reply.residual is not None})

    def get(self, max_body: int) -> Reply | None:
        """The kept reply, or None (none, or unreadable: then the round is simply retrained)."""
        try:
            doc = json.loads((self.dir / "reply.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s); a re-sent task will be trained again",
                        self.dir / "reply.json", exc)
            return None
        try:
            manifest = envelope.parse_manifest(doc["manifest"], max_body=max_body)
            body = (self.dir / "reply.body").read_bytes()
            if envelope.sha256_hex(body) != manifest.body_digest:
                raise ValueError("body does not match its manifest")
            residual = None
            if doc.get("residual"):
                residual = np.frombuffer((self.dir / "reply.residual.f32").read_bytes(),
                                         dtype="<f4").astype(np.float32)
            return Reply(str(doc["run"]), str(doc["task_digest"]), manifest, body, residual)
        except (OSError, KeyError, TypeError, ValueError, ProtocolError) as exc:
            log.warning("kept reply in %s unusable (%s); a re-sent task will be trained again",
                        self.dir, exc)
            return None

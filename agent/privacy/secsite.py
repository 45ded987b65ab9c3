"""A site's side of secure aggregation: which epoch it masked for, and when it may reveal.

The rules that keep a single update hidden (docs/privacy.md), kept in one small state file
(0600) so a restarted site follows them too:
- a site masks for an epoch of a round only if it is later than the one it masked before;
- it reveals an epoch's self-mask seed only if that epoch is the last it masked for, and the
  coordinator's announcement lists every member of the epoch as received;
- once it has revealed in a round it masks again in that round only for the very same members
  (a coordinator that lost its state re-runs the round; a subset would let it subtract).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ProtocolError
from agent.ops.atomic import write_bytes_atomic
from agent.privacy.secagg import self_seed

log = logging.getLogger(__name__)

STATE_FILE = "secagg-state.json"


@dataclass
class Epoch:
    run: str
    round: int
    epoch: int
    members: list[str]
    seed: bytes
    revealed: bool = False
    revealed_for: list[str] | None = None  # members of an epoch of this round once revealed


class SecureState:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.last: Epoch | None = self._load()

    def _load(self) -> Epoch | None:
        try:
            doc = json.loads(self.path.read_text())
            return Epoch(run=str(doc["run"]), round=int(doc["round"]), epoch=int(doc["epoch"]),
                         members=[str(m) for m in doc["members"]],
                         seed=base64.b64decode(doc["seed"]), revealed=bool(doc["revealed"]),
                         revealed_for=doc.get("revealed_for"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: refuse to reveal anything of it (the round is re-run, never unmasked
            # from a guess); masking afresh is safe.
            log.warning("%s unreadable (%s); starting without it", self.path, type(exc).__name__)
            return None

    def _save(self) -> None:
        e = self.last
        assert e is not None
        doc = {"run": e.run, "round": e.round, "epoch": e.epoch, "members": e.members,
               "seed": base64.b64encode(e.seed).decode(), "revealed": e.revealed,
               "revealed_for": e.revealed_for}
        write_bytes_atomic(self.path, json.dumps(doc).encode(), mode=0o600)

    def begin(self, run: str, rnd: int, epoch: int, members: list[str]) -> bytes:
        """The self-mask seed for masking this epoch, kept before anything is sent."""
        last = self.last
        revealed_for = None
        if last is not None and (last.run, last.round) == (run, rnd):
            if last.epoch == epoch and last.members == members and not last.revealed:
                return last.seed  # the same epoch again (a restart): the same masks
            if last.epoch >= epoch:
                raise ProtocolError("stale_epoch", f"epoch {epoch} after {last.epoch}")
            revealed_for = last.revealed_for
            if revealed_for is not None and sorted(members) != sorted(revealed_for):
                raise ProtocolError("already_revealed", f"round {rnd}: revealed for other "
                                                        "members")
        self.last = Epoch(run=run, round=rnd, epoch=epoch, members=list(members),
                          seed=self_seed(), revealed_for=revealed_for)
        self._save()
        return self.last.seed

    def reveal(self, run: str, rnd: int, epoch: int, members: list[str],
               received: list[str]) -> bytes:
        """The seed of the epoch the coordinator says is complete, or why not."""
        last = self.last
        if last is None or (last.run, last.round, last.epoch) != (run, rnd, epoch):
            raise ProtocolError("not_last_epoch", f"round {rnd} epoch {epoch}")
        if last.members != members or sorted(received) != sorted(members):
            raise ProtocolError("epoch_incomplete", f"round {rnd} epoch {epoch}")
        if not last.revealed:
            last.revealed, last.revealed_for = True, list(members)
            self._save()
        return last.seed

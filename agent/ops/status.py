"""Retained status documents: flat JSON that Telegraf, Zabbix or Node-RED can read as is.

Status is deliberately *not* a fedsilo envelope: monitoring tools must read it without our code.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Any

from agent import __version__

STATUS_SCHEMA_VERSION = 1


class State(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"  # connected, waiting for work
    STATS = "stats"  # computing / collecting federated statistics
    TRAINING = "training"
    UPLOADING = "uploading"
    COLLECTING = "collecting"  # coordinator: waiting for updates
    AGGREGATING = "aggregating"
    FINISHED = "finished"
    OFFLINE = "offline"
    ERROR = "error"


def status_document(*, role: str, identity: str, federation: str, state: State,
                    round: int | None, last_error: str | None = None,
                    extra: dict[str, Any] | None = None,
                    now: float | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": STATUS_SCHEMA_VERSION,
        "role": role,
        "id": identity,
        "federation": federation,
        "state": state.value,
        "round": round,
        "version": __version__,
        "last_error": last_error,
        "ts": round_ts(time.time() if now is None else now),
    }
    for k, v in (extra or {}).items():
        doc.setdefault(k, v)
    return doc


def round_ts(t: float) -> float:
    return float(f"{t:.3f}")


def encode_status(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def offline_status(*, role: str, identity: str, federation: str, reason: str) -> bytes:
    """The last will (reason 'connection_lost') and the clean-stop message (reason 'stopped')."""
    return encode_status(status_document(role=role, identity=identity, federation=federation,
                                         state=State.OFFLINE, round=None,
                                         extra={"offline_reason": reason}))

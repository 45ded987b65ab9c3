"""`fedsilo status`: every site and coordinator the broker holds a retained status for.

Reads the retained status topics (docs/status.schema.json) once, or again every few seconds
with `--watch`, and prints a table an operator can read or one JSON object for scripts:
`{"federations": {fed: {"coordinator": status | null, "sites": {id: status}}}}`.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import time
from typing import Any

from agent.config import BrokerConfig
from agent.federation import topics
from agent.federation.transport import Transport

log = logging.getLogger(__name__)

COLUMNS = (("id", 22), ("role", 12), ("state", 12), ("round", 6), ("last seen", 10),
           ("throttled", 10), ("rejected", 9), ("cert days", 10), ("last error", 24))


def collect(broker: BrokerConfig, wait_s: float = 1.5, client_id: str | None = None
            ) -> dict[str, Any]:
    """Connect, take the retained status messages, disconnect."""
    t = Transport(client_id or f"fedsilo-status-{time.monotonic_ns()}", broker,
                  subscriptions=["fedsilo/v1/+/site/+/status", "fedsilo/v1/+/coordinator/status"])
    t.connect()
    feds: dict[str, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = t.receive(left)
            except queue.Empty:
                break
            topic = topics.parse(msg.topic)
            if not msg.payload:
                continue  # a cleared retained message
            doc, reason = _status_doc(msg.payload) if topic is not None else (None, "bad_topic")
            if doc is None:
                log.warning("ignored status on %s (%d bytes): %s", msg.topic[:200],
                            len(msg.payload), reason)
                continue
            fed = feds.setdefault(topic.federation, {"coordinator": None, "sites": {}})
            if topic.sender == "coordinator":
                fed["coordinator"] = doc
            else:
                fed["sites"][topic.sender] = doc
    finally:
        t.close()
    return {"federations": feds}


def _status_doc(payload: bytes) -> tuple[dict[str, Any] | None, str]:
    """A status document, or None and why: what a broker holds is anyone's to have written."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, an integer of >4300 digits
        return None, "bad_status_json"
    return (doc, "") if isinstance(doc, dict) else (None, "bad_status_json")


def table(snapshot: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = []
    for fed, parts in sorted(snapshot["federations"].items()):
        lines.append(f"federation {fed}")
        lines.append("".join(f"{name:<{w}}" for name, w in COLUMNS))
        docs = ([parts["coordinator"]] if parts["coordinator"] else []) + [
            parts["sites"][s] for s in sorted(parts["sites"])]
        for d in docs:
            ts = d.get("ts")
            seen = "" if not _is_time(ts) else _ago(now - ts)
            cells = (d.get("id"), d.get("role"), d.get("state"), d.get("round"), seen,
                     d.get("throttled"), d.get("rejected_messages"), d.get("cert_days_left"),
                     d.get("last_error"))
            lines.append("".join(f"{'' if v is None else str(v)[:w - 1]:<{w}}"
                                 for v, (_, w) in zip(cells, COLUMNS, strict=True)))
        lines.append("")
    return "\n".join(lines) if lines else "no fedsilo status on this broker"


def _is_time(ts: Any) -> bool:
    """A number that subtracts from a float: 10**400 would raise OverflowError."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return False
    try:
        return math.isfinite(ts)
    except OverflowError:
        return False


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, seconds):.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"

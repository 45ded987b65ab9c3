"""The privacy ledger: an append-only, hash-chained record of everything that left the site.

A hospital's data-protection officer asks "what exactly left this building?"; the answer is
`<state_dir>/privacy-ledger.jsonl`, one JSON object per line (sorted keys, compact, ASCII),
mode 0600. The site records an entry BEFORE it publishes the body, and `append` returns only
after the line is fsynced, so nothing leaves unrecorded. An entry therefore means "released
for sending": if the process dies after recording and before sending, the entry stays, and the
resend after restart does not add a second one — `append` returns the earlier entry when one
with the same (federation, run, round, kind, digest, destination) is already in the file (the
same bytes to the same place are not a new release).

Each entry carries `prev`, the sha256 of the previous line's exact bytes (without its newline;
for seq 0 the sha256 of a genesis string naming the federation), and `hash`, the sha256 of its
own canonical JSON without `hash`. `verify_bytes` checks the chain as a pure function over the
file's bytes. The chain detects edits, deletions and reordering; it cannot detect a consistent
rewrite of the whole file, or the removal of the last entries, by someone with write access to
the state directory — copy the latest hash off the host for that (docs/privacy.md).

A last line without its newline is what a crash mid-append leaves; `verify_bytes` reports it as
truncated (not as tampering) and `Ledger` cuts it when it opens the file (append had not
returned, so nothing was sent for it). A bad line anywhere else is never repaired: `Ledger`
refuses to open such a file, so the site sends nothing until a person has looked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import FedsiloError
from agent.ops.atomic import fsync_dir
from agent.ops.statedir import describe

log = logging.getLogger(__name__)

LEDGER_NAME = "privacy-ledger.jsonl"
GENESIS = "fedsilo privacy ledger v1\nfederation={federation}\n"
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")  # e.g. stats, update, evaluation, metrics
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_DETAIL_BYTES = 4096  # detail holds a few facts (codec, secure, clipped values), not data
MAX_TEXT = 512  # federation, run and destination strings

FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,), "ts": (int, float), "federation": (str,), "run": (str,), "round": (int,),
    "kind": (str,), "bytes": (int,), "digest": (str,), "destination": (str,),
    "epsilon": (int, float, type(None)), "detail": (dict,), "prev": (str,), "hash": (str,),
}


class LedgerError(FedsiloError):
    """The ledger cannot be used as it is (broken chain, refused entry); exit status 1."""


def ledger_path(state_dir: str | Path) -> Path:
    """Where a site keeps its ledger."""
    return Path(state_dir) / LEDGER_NAME


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The one byte form of an entry: what is written, hashed and chained."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def genesis_hash(federation: str) -> str:
    """The `prev` of seq 0: ties the first entry to its federation."""
    return sha256_hex(GENESIS.format(federation=federation).encode())


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 over the entry's canonical JSON without its `hash` field."""
    return sha256_hex(canonical({k: v for k, v in entry.items() if k != "hash"}))


# ------------------------------------------------------------------------------ verification

@dataclass
class LedgerReport:
    """What `verify_bytes` found. Counts cover the entries before the first bad one."""

    entries: int = 0  # complete lines that verified, from the start
    lines: int = 0  # complete lines in the file
    count_by_kind: dict[str, int] = field(default_factory=dict)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)  # "federation/run" -> last epsilon
    last_seq: int | None = None
    last_hash: str | None = None  # the last good entry's `hash` field (copy it off the host)
    head: str = ""  # sha256 of the last good line: the `prev` the next entry must carry
    good_length: int = 0  # bytes of the file up to and including the last good line
    bad_line: int | None = None  # 1-based line number of the first bad entry
    bad_seq: int | None = None  # its seq field, when it has a readable one
    problem: str | None = None  # what is wrong with it, in words
    truncated: bool = False  # the file ends in a partial line (a crash mid-append)
    truncated_bytes: int = 0

    @property
    def ok(self) -> bool:
        """Every complete line verifies (a truncated tail alone is a crash, not tampering)."""
        return self.problem is None

    @property
    def status(self) -> str:
        return "broken" if not self.ok else "truncated" if self.truncated else "intact"

    def describe(self, where: str = "privacy ledger") -> str:
        """One line for a person."""
        if not self.ok:
            seq = f", seq {self.bad_seq}" if self.bad_seq is not None else ""
            return (f"{where}: chain broken at line {self.bad_line}{seq}: {self.problem}; "
                    f"{self.entries} entries before it verify")
        last = (f", last seq {self.last_seq}, hash {self.last_hash}"
                if self.last_seq is not None else "")
        text = f"{where}: intact, {self.entries} entries{last}"
        if self.truncated:
            text += (f"; the last line is truncated ({self.truncated_bytes} bytes, a crash while "
                     f"recording: nothing was sent for it; the site cuts it when it next starts)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "ok": self.ok, "entries": self.entries,
                "lines": self.lines, "count_by_kind": self.count_by_kind,
                "bytes_by_kind": self.bytes_by_kind, "epsilon": self.epsilon,
                "last_seq": self.last_seq, "last_hash": self.last_hash, "head": self.head,
                "bad_line": self.bad_line, "bad_seq": self.bad_seq, "problem": self.problem,
                "truncated": self.truncated, "truncated_bytes": self.truncated_bytes}


def _field_problem(entry: Mapping[str, Any]) -> str | None:
    for name, types in FIELDS.items():
        if name not in entry:
            return f"field {name!r} is missing"
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"field {name!r} has the wrong type ({type(value).__name__})"
    if entry["seq"] < 0 or entry["round"] < 0 or entry["bytes"] < 0:
        return "seq, round and bytes must not be negative"
    if not math.isfinite(entry["ts"]) or entry["ts"] < 0:
        return f"ts {entry['ts']!r} is not a time"
    eps = entry["epsilon"]
    if eps is not None and (not math.isfinite(eps) or eps < 0):
        return f"epsilon {eps!r} is not a non-negative number"
    if not KIND_PATTERN.fullmatch(entry["kind"]):
        return f"kind {entry['kind']!r} does not match {KIND_PATTERN.pattern}"
    for name in ("digest", "prev", "hash"):
        if not HEX64.fullmatch(entry[name]):
            return f"field {name!r} is not a sha256 hex digest"
    return None


def _line_problem(raw: bytes, entry: Any, expected_seq: int, prev_line_hash: str | None,
                  last_ts: float | None, last_eps: dict[str, float]) -> str | None:
    """Why one complete line does not continue the chain, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    bad = _field_problem(entry)
    if bad:
        return bad
    if entry["seq"] != expected_seq:
        return (f"seq is {entry['seq']}, expected {expected_seq} (a line was deleted, "
                f"inserted or moved here)")
    if entry_hash(entry) != entry["hash"]:
        return "hash does not match the entry's content (the entry was edited)"
    if prev_line_hash is None:
        if entry["prev"] != genesis_hash(entry["federation"]):
            return (f"prev is not the genesis hash of federation {entry['federation']!r} "
                    f"(the first entry was replaced or edited)")
    elif entry["prev"] != prev_line_hash:
        return ("prev does not match the previous line (that line was edited, or lines were "
                "removed or reordered)")
    if canonical(entry) != raw:
        return "not in canonical form (sorted keys, compact): edited after it was written"
    if last_ts is not None and entry["ts"] < last_ts:
        return f"ts {entry['ts']} is earlier than the previous entry's {last_ts}"
    track = f"{entry['federation']}/{entry['run']}"
    eps = entry["epsilon"]
    if eps is not None and track in last_eps and eps < last_eps[track]:
        return (f"epsilon {eps} is lower than the {last_eps[track]} recorded before for run "
                f"{entry['run']!r}")
    return None


def verify_bytes(data: bytes) -> LedgerReport:
    """Check a ledger's bytes: JSON per line, seq from 0, prev chain, hash, canonical form,
    ts and (per run) epsilon non-decreasing. Stops at the first bad entry."""
    report = LedgerReport()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" for a complete file
    if tail:
        report.truncated, report.truncated_bytes = True, len(tail)
    report.lines = len(lines)
    offset = 0
    prev_line_hash: str | None = None
    last_ts: float | None = None
    for number, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError):
            entry = ...
        if entry is ... or entry is None:
            report.bad_line = number
            report.problem = ("an empty line" if not raw else
                              "not valid JSON (the line was edited or corrupted)")
            return report
        problem = _line_problem(raw, entry, report.entries, prev_line_hash, last_ts,
                                report.epsilon)
        if problem:
            report.bad_line, report.problem = number, problem
            seq = entry.get("seq") if isinstance(entry, dict) else None
            report.bad_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
            return report
        kind = entry["kind"]
        report.count_by_kind[kind] = report.count_by_kind.get(kind, 0) + 1
        report.bytes_by_kind[kind] = report.bytes_by_kind.get(kind, 0) + entry["bytes"]
        if entry["epsilon"] is not None:
            report.epsilon[f"{entry['federation']}/{entry['run']}"] = float(entry["epsilon"])
        report.entries += 1
        report.last_seq, report.last_hash = entry["seq"], entry["hash"]
        prev_line_hash = report.head = sha256_hex(raw)
        last_ts = entry["ts"]
        offset += len(raw) + 1
        report.good_length = offset
    return report


def verify(path: str | Path) -> LedgerReport:
    """`verify_bytes` over a ledger file (OSError, e.g. FileNotFoundError, is the caller's)."""
    return verify_bytes(Path(path).read_bytes())


def parse_lines(data: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    """(line, entry) for every complete line that is a JSON object, in file order, verified
    or not: what a listing shows next to the chain's status."""
    out = []
    for raw in data.split(b"\n")[:-1]:
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(entry, dict):
            out.append((raw, entry))
    return out


def parse_entries(data: bytes) -> list[dict[str, Any]]:
    """The entries of `parse_lines`."""
    return [entry for _, entry in parse_lines(data)]


# ---------------------------------------------------------------------------------- writing

def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise ValueError(f"privacy ledger: {name} must be a non-empty string of at most "
                         f"{MAX_TEXT} characters, not {value!r}")
    return value


class Ledger:
    """The site's one writer of its ledger (one per state directory; a lock for its threads).

    Opening reads and verifies the file, cuts a truncated last line (with a warning), and
    refuses a broken chain with LedgerError. Write failures raise StateError (disk full, not
    writable) after cutting what was half written, so the caller does not send."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        with self._lock:
            self._load()

    @classmethod
    def for_state_dir(cls, state_dir: str | Path) -> Ledger:
        return cls(ledger_path(state_dir))

    def _load(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(os.dup(fd), "rb") as fh:
                    data = fh.read()
                report = verify_bytes(data)
                if not report.ok:
                    raise LedgerError(report.describe(str(self.path)) + "; move the file aside "
                                      "(keep it for the data-protection officer) to start a "
                                      "new ledger")
                if report.truncated:
                    os.ftruncate(fd, report.good_length)
                    os.fsync(fd)
                    log.warning("privacy ledger %s: cut a partial last line (%d bytes) left by "
                                "a crash while recording; nothing was sent for it",
                                self.path, report.truncated_bytes)
                elif not data:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not data:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise describe(self.path.parent, exc) from None
        entries = parse_entries(data[:report.good_length])
        self._size = report.good_length
        self._next_seq = report.entries
        self._head = report.head or None
        self._last_ts = entries[-1]["ts"] if entries else 0.0
        self._epsilon = dict(report.epsilon)
        self._seen = {self._key(e): e for e in entries}

    @staticmethod
    def _key(e: Mapping[str, Any]) -> tuple[Any, ...]:
        return (e["federation"], e["run"], e["round"], e["kind"], e["digest"], e["destination"])

    def append(self, *, federation: str, run: str, round: int, kind: str, destination: str,
               body: bytes | bytearray | memoryview | None = None, digest: str | None = None,
               size: int | None = None, epsilon: float | None = None,
               detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record one release (call BEFORE publishing) and return its entry, durable on disk.

        Give the `body` that leaves, or its sha256 `digest` and `size` in bytes. `epsilon` is
        the cumulative epsilon spent after this release (None without DP); it may not go down
        within a run. A release already recorded with the same (federation, run, round, kind,
        digest, destination) — a resend — is not recorded again: the earlier entry is
        returned."""
        federation, run, destination = (_text("federation", federation), _text("run", run),
                                        _text("destination", destination))
        if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
            raise ValueError(f"privacy ledger: kind {kind!r} does not match "
                             f"{KIND_PATTERN.pattern}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"privacy ledger: round must be an int >= 0, not {round!r}")
        if body is not None:
            if digest is not None or size is not None:
                raise ValueError("privacy ledger: give body, or digest and size, not both")
            view = memoryview(body)
            digest, size = sha256_hex(view), view.nbytes
        if not isinstance(digest, str) or not HEX64.fullmatch(digest):
            raise ValueError("privacy ledger: digest must be a lowercase sha256 hex digest")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"privacy ledger: size must be an int >= 0, not {size!r}")
        if epsilon is not None:
            if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) \
                    or not math.isfinite(epsilon) or epsilon < 0:
                raise ValueError(f"privacy ledger: epsilon {epsilon!r} is not a number >= 0")
            epsilon = float(epsilon)
        try:
            encoded = canonical(dict(detail or {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"privacy ledger: detail is not plain JSON ({exc})") from None
        detail, detail_size = json.loads(encoded), len(encoded)  # as it will read back
        if detail_size > MAX_DETAIL_BYTES:
            raise ValueError(f"privacy ledger: detail is {detail_size} bytes, at most "
                             f"{MAX_DETAIL_BYTES}: it holds facts about a release, not data")
        with self._lock:
            key = (federation, run, round, kind, digest, destination)
            if key in self._seen:
                return dict(self._seen[key])
            track = f"{federation}/{run}"
            if epsilon is not None and epsilon < self._epsilon.get(track, 0.0):
                raise LedgerError(f"privacy ledger: epsilon {epsilon} is lower than the "
                                  f"{self._epsilon[track]} already spent in run {run!r}")
            # A wall clock stepped back (NTP) must not make the record look reordered.
            ts = max(_now_ms(), self._last_ts)
            entry: dict[str, Any] = {
                "seq": self._next_seq, "ts": ts, "federation": federation, "run": run,
                "round": round, "kind": kind, "bytes": size, "digest": digest,
                "destination": destination, "epsilon": epsilon, "detail": detail,
                "prev": self._head or genesis_hash(federation)}
            entry["hash"] = entry_hash(entry)
            line = canonical(entry)
            self._write(line + b"\n")
            self._size += len(line) + 1
            self._next_seq += 1
            self._head = sha256_hex(line)
            self._last_ts = ts
            if epsilon is not None:
                self._epsilon[track] = epsilon
            self._seen[key] = entry
            return dict(entry)

    def _write(self, data: bytes) -> None:
        """Append and fsync; on failure cut back to the last whole line and raise."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise describe(self.path.parent, exc) from None
        try:
            if os.fstat(fd).st_size != self._size:
                raise LedgerError(f"privacy ledger {self.path}: the file changed under the "
                                  f"site (expected {self._size} bytes); it has one writer, "
                                  f"the site: restart it to verify the file again")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, self._size)
                os.fsync(fd)
            except OSError:
                pass
            raise describe(self.path.parent, exc) from None
        finally:
            os.close(fd)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every recorded entry, oldest first (a snapshot of the file as it is now)."""
        with self._lock:
            try:
                data = self.path.read_bytes()[:self._size]
            except OSError as exc:
                raise describe(self.path.parent, exc) from None
        yield from parse_entries(data)

    def __len__(self) -> int:
        return self._next_seq


def _now_ms() -> float:
    return round(time.time(), 3)

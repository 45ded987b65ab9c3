"""Reader processes for the one-shot tree walk, so reading a folder uses every core.

Each reader runs the whole ingest of a file — read, check, pseudonymise, decode, in-plane
preprocessing, store — through its own `IngestPipeline` on the same state directory (SQLite in
WAL mode, pending frames appended with O_APPEND, so readers and the agent write side by side),
and answers with the outcome only: status and reason code. Compressed files are answered
"deferred" and the agent ingests them itself, so their decoding stays in `DecodePool`'s
crash-isolated workers.

Readers commit every `batch` files and say so in that answer; the agent counts an outcome only
once its commit is confirmed. At the end the agent asks every reader to commit and waits. A
reader that dies or hangs costs the file it held (`decode_crashed` / `decode_timeout`, the
file is quarantined); the files it had answered but not committed, and those queued behind,
are handed back and the agent ingests them itself. Nothing is lost or counted twice.

The agent never waits for readers to start: they start in a background thread (the first
start of the forkserver imports numpy, pydicom and the kernels, ~0.6 s), while no reader has
room the agent ingests the next file itself, and readers not up when the last file has been
handed out are stopped unused. The wire is byte messages, never pickle: a
path out, a small JSON answer back. The pseudonymisation key is read by each reader from the
state directory.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent.config import ImagingSpec
from agent.ingest.decode_worker import READY, STARTUP_TIMEOUT_S, WorkerProcess
from agent.ingest.quarantine import (
    DECODE_CRASHED,
    DECODE_TIMEOUT,
    DEFERRED,
    QUARANTINED,
    REASON_PATTERN,
    Rejected,
)

log = logging.getLogger(__name__)

DEPTH = 4  # files queued per reader, so none waits while the agent is busy with a file
_PRELOAD = ["numpy", "pydicom", "agent.ingest.pipeline", "agent.ingest._reader_preload"]
_COMMIT = b""  # request: commit what you hold and say so
_COMMIT_MARK = Path("<commit>")  # stands for that request among the files a reader was sent
_STATUSES = frozenset({"stored", "duplicate", "quarantined", "skipped", DEFERRED})

# One result per file: (path, status, reason). DEFERRED: the agent ingests the file itself;
# QUARANTINED with a decode_* reason from the pool itself: the reader died on that file.
# After a commit, an int: how many of the files just committed as stored were found stored
# by another process at commit time (duplicates after all).
Result = tuple[Path, str, str | None]


# ---------------------------------------------------------------------------- reader side


class _DeferCompressed:
    """The reader's decoder: compressed data goes back to the agent."""

    def decode(self, path: Path) -> Any:
        raise Rejected(DEFERRED, status=DEFERRED)


def _serve(conn: Connection, state_dir: str, imaging_json: str, backend: str,
           batch: int) -> None:
    """Reader main loop: a path in, an outcome out; an empty request commits."""
    import warnings

    from agent.ingest.pipeline import IngestPipeline

    warnings.simplefilter("ignore")  # this process's warnings could quote file values
    logging.disable(logging.CRITICAL)
    imaging = ImagingSpec(**json.loads(imaging_json)) if imaging_json else None
    pipeline = IngestPipeline(Path(state_dir), imaging, kernel_backend=backend,
                              decoder=_DeferCompressed(), tree_workers=1)  # type: ignore[arg-type]
    held = 0
    with pipeline.store.group(1 << 30):  # commits happen below, when the agent is told
        conn.send_bytes(READY)
        while True:
            try:
                request = conn.recv_bytes()
            except (EOFError, OSError):
                return
            answer: dict[str, Any] = {}
            if request != _COMMIT:
                outcome = pipeline.ingest_file(Path(os.fsdecode(request)), source="tree")
                answer = {"status": outcome.status, "reason": outcome.reason}
                held += 1
            if request == _COMMIT or held >= batch:
                late = pipeline.store.late_duplicates
                try:
                    pipeline.store.commit_group()
                except Exception:  # noqa: BLE001 - the agent redoes what this reader held
                    conn.send_bytes(b'{"commit_failed": true}')
                    return
                answer["committed"] = True
                answer["late_duplicates"] = pipeline.store.late_duplicates - late
                held = 0
            conn.send_bytes(json.dumps(answer).encode())


# ---------------------------------------------------------------------------- agent side


class _Reader(WorkerProcess):
    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        super().__init__(ctx, _serve, args, "fedsilo-tree")
        self.sent: deque[Path] = deque()  # sent, not yet answered, in order
        self.held: list[Result] = []  # answered, not yet committed


class TreePool:
    """`workers` reader processes for one tree walk; use as a context manager."""

    def __init__(self, workers: int, state_dir: Path, imaging: ImagingSpec | None,
                 backend: str, timeout_s: float, batch: int) -> None:
        self.timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("forkserver")
        try:
            self._ctx.set_forkserver_preload(_PRELOAD)
        except Exception:  # noqa: BLE001 - only an optimisation
            pass
        self._args = (str(state_dir), "" if imaging is None else json.dumps(asdict(imaging)),
                      backend, max(1, batch))
        self._readers: list[_Reader] = []
        self._lock = threading.Lock()
        self._closed = False
        self._starter = threading.Thread(target=self._start, args=(max(1, workers),),
                                         name="fedsilo-tree-start", daemon=True)
        self._starter.start()

    def _start(self, n: int) -> None:
        for _ in range(n):
            try:
                reader = _Reader(self._ctx, self._args)
                ok = reader.conn.poll(STARTUP_TIMEOUT_S) and reader.conn.recv_bytes() == READY
            except (OSError, EOFError, RuntimeError):
                log.warning("could not start a tree reader process; reading in the agent")
                return
            with self._lock:
                if self._closed or not ok:
                    reader.stop(kill=True)
                    return
                self._readers.append(reader)

    def __enter__(self) -> TreePool:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for r in readers:
            r.stop(kill=any(exc))
        # Not waiting for the starter: a reader still starting is stopped by it when ready.

    def offer(self, path: Path) -> bool:
        """Queue `path` on a started reader with room; False when none has (read it
        yourself)."""
        with self._lock:
            free = [r for r in self._readers if len(r.sent) < DEPTH]
        if not free:
            return False
        reader = min(free, key=lambda r: len(r.sent))
        try:
            reader.conn.send_bytes(os.fsencode(str(path)))
        except OSError:
            return False  # it died: the next receive notices and hands its files back
        reader.sent.append(path)
        return True

    def ready(self) -> Iterator[Result | int]:
        """Committed results available now, without waiting."""
        for reader in list(self._readers):
            while reader.sent and reader.conn.poll(0):
                yield from self._receive(reader)

    def request_commit(self) -> None:
        """Ask every reader to commit after its last file (the request queues behind the
        files); the agent can commit its own meanwhile. Readers not started by now are not
        waited for (on a small tree the agent has read every file before they are up)."""
        with self._lock:
            self._closed = True
            readers = list(self._readers)
        for reader in readers:
            try:
                reader.conn.send_bytes(_COMMIT)
            except OSError:
                pass  # it died: receiving notices and hands its files back
            reader.sent.append(_COMMIT_MARK)

    def finish(self) -> Iterator[Result | int]:
        """Every remaining result, up to each reader's commit (`request_commit` first)."""
        with self._lock:
            readers = list(self._readers)
        for reader in readers:
            while reader.sent:
                yield from self._receive(reader, commit=reader.sent[0] is _COMMIT_MARK)

    def _receive(self, reader: _Reader, commit: bool = False) -> Iterator[Result | int]:
        path = reader.sent[0]
        try:
            if not reader.conn.poll(self.timeout_s):
                yield from self._drop(reader, DECODE_TIMEOUT, commit)
                return
            answer = json.loads(reader.conn.recv_bytes(maxlength=4096))
        except (EOFError, OSError, ValueError):
            yield from self._drop(reader, DECODE_CRASHED, commit)
            return
        if not isinstance(answer, dict) or answer.get("commit_failed"):
            yield from self._drop(reader, None, commit)
            return
        reader.sent.popleft()
        if not commit:
            status, reason = answer.get("status"), answer.get("reason")
            if status not in _STATUSES or not (reason is None or (
                    isinstance(reason, str) and REASON_PATTERN.fullmatch(reason))):
                status, reason = DEFERRED, None  # not an answer we know: redo the file here
            reader.held.append((path, status, reason))
        if answer.get("committed"):
            yield from reader.held
            reader.held.clear()
            late = answer.get("late_duplicates")
            if isinstance(late, int) and late > 0:
                yield late

    def _drop(self, reader: _Reader, reason: str | None, commit: bool) -> Iterator[Result]:
        """Stop a reader that died, hung or could not commit: the file it was on gets
        `reason` (quarantined); everything else it had is handed back."""
        with self._lock:
            if reader in self._readers:
                self._readers.remove(reader)
        reader.stop(kill=True)
        log.warning("tree reader process %s; its files are read by the agent",
                    {DECODE_TIMEOUT: "timed out", DECODE_CRASHED: "failed"}.get(
                        reason or "", "could not commit"))
        sent = [p for p in reader.sent if p is not _COMMIT_MARK]
        if commit:
            reason = None  # it failed while committing, not on a file
        for path, _, _ in reader.held:
            yield path, DEFERRED, None
        if sent and reason is not None:
            yield sent.pop(0), QUARANTINED, reason
        for path in sent:
            yield path, DEFERRED, None
        reader.held.clear()
        reader.sent.clear()

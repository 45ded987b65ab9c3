"""The site agent's imaging side as one service: listener + watch folder -> one queue -> pipeline.

The DICOM listener and the watch folder only drop files into `incoming/` and enqueue them; one
consumer thread runs the ingest pipeline on each (so decoding never blocks a C-STORE
association or the MQTT loop) and completes series after their quiet period. The federation
code asks this service for the preprocessed image of each (pseudonymised) patient.

A file from the watch folder (or left in `incoming/` by an earlier run) that reads as
truncated may still be written: a writer the watch folder could not see kept its file open
and paused longer than the settle time. It is not quarantined at once but kept in
`incoming/` and read again once it has not changed for `TRUNCATED_RETRY_S`; only a file
still truncated then is quarantined.

The queue is bounded (`dicom.queue_files`) and so are the bytes waiting in `incoming/`
(`dicom.incoming_max_bytes`): beyond either, the listener answers the C-STORE with 0xA700
(Out of Resources; the file is not kept, the PACS retries later) and the watch folder waits,
leaving files where they are. Files left in `incoming/` by an earlier run are read first,
outside the queue.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import DicomSources, ImagingSpec
from agent.errors import FedsiloError
from agent.ingest.deid import load_or_create_secret, pseudonym
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.quarantine import HELD, TRUNCATED

log = logging.getLogger(__name__)

COMPLETE_EVERY_S = 1.0
TRUNCATED_RETRY_S = 60.0  # quiet time before a truncated watch-folder file is read again
_HOLD_SOURCES = frozenset({"watch", "incoming"})  # the listener receives whole data sets
QUEUE_FULL, INCOMING_FULL = "queue_full", "incoming_full"


class IngestFull(FedsiloError):
    """The ingest side cannot take a file now (`reason`: queue_full / incoming_full)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass
class _Held:
    size: int
    mtime_ns: int
    since: float  # monotonic time of the last change seen


class IngestService:
    def __init__(self, state_dir: Path, dicom: DicomSources, *,
                 kernel_backend: str = "auto", workers: int | None = None) -> None:
        """`workers`: the hardware profile's `ingest_workers` (decoder and tree-reader
        processes, each at most); None: the pipeline's defaults."""
        self.state_dir = Path(state_dir)
        self.dicom = dicom
        self.incoming = self.state_dir / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        sizing = {} if workers is None else {"decode_workers": workers, "tree_workers": workers}
        self.pipeline = IngestPipeline(self.state_dir, None, kernel_backend=kernel_backend,
                                       quarantine_max_bytes=dicom.quarantine_max_bytes,
                                       **sizing)
        self.secret = load_or_create_secret(self.state_dir)
        self.queue: queue.Queue[tuple[Path, str]] = queue.Queue(maxsize=dicom.queue_files)
        self._incoming: dict[Path, int] = {}  # files in incoming/ known to us -> bytes
        self._incoming_lock = threading.Lock()
        self._leftover: list[Path] = []
        self.refused: dict[str, int] = {QUEUE_FULL: 0, INCOMING_FULL: 0}
        self._waiting_since: float | None = None  # the watch folder waits for room
        self._resume = threading.Event()  # cleared: the consumer takes nothing (pause_consumer)
        self._resume.set()
        self._held: dict[Path, _Held] = {}  # read as truncated, waiting to be read again
        self._stop = threading.Event()
        self._closing = threading.Event()  # set first on stop: the watch folder stops waiting
        self._thread = threading.Thread(target=self._consume, name="ingest", daemon=True)
        self._listener = None
        self._watch = None
        self.on_tick: Callable[[], None] | None = None  # after each completion pass
        self.scorer: Any = None  # agent.results.scoring.SiteScorer, when [results] score

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # Files left in incoming/ by a previous run (crash, restart) are ingested first.
        for path in sorted(self.incoming.glob("*")):
            if path.is_file() and not path.name.startswith("."):
                self._leftover.append(path)
                self._incoming[path] = _size(path)
        if self.dicom.listen:
            from agent.ingest.listener import DicomListener

            self._listener = DicomListener(self.dicom, self.incoming, self.enqueue)
            self._listener.start()
            log.info("DICOM listener %s on port %d", self.dicom.ae_title, self._listener.port)
        if self.dicom.watch_dir is not None:
            from agent.ingest.watch import WatchFolder

            self._watch = WatchFolder(self.dicom.watch_dir, self.incoming, self.enqueue)
            self._watch.start()
            log.info("watching %s for DICOM files", self.dicom.watch_dir)
        self._thread.start()

    def attach_scorer(self, results: Any, data: Any, verifier: Any | None) -> None:
        """Score completed series with the site's exported model (agent.results.scoring), on
        this service's thread; call before start()."""
        from agent.results.scoring import SiteScorer

        self.scorer = SiteScorer(self.state_dir, results, data, store=self.pipeline.store,
                                 secret=self.secret, verifier=verifier,
                                 set_imaging=self.set_imaging)
        self.pipeline.on_stored = self.scorer.capture
        self.on_tick = self.scorer.poll

    def stop(self) -> None:
        self._closing.set()
        for component in (self._listener, self._watch):
            if component is not None:
                component.stop()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.scorer is not None:
            self.scorer.close()
        self.pipeline.close()

    @property
    def listener_port(self) -> int | None:
        return None if self._listener is None else self._listener.port

    @property
    def incoming_bytes(self) -> int:
        with self._incoming_lock:
            return sum(self._incoming.values())

    def enqueue(self, path: Path, source: str) -> None:
        """Hand a file in `incoming/` to the ingest thread. The listener's files are refused
        at once when the queue or `incoming/` is full (IngestFull: it answers 0xA700 and drops
        its copy); the watch folder's wait for room, so its files stay in the watch folder."""
        size = _size(path)
        if source != "watch":
            self._admit(path, size, source)
            return
        while True:
            try:
                self._admit(path, size, source)
                self._waiting_since = None
                return
            except IngestFull:
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                    log.warning("ingest is full (queue or incoming/): the watch folder waits")
                if self._closing.wait(0.2):
                    raise  # stopping: the file stays in incoming/, read at the next start

    def _admit(self, path: Path, size: int, source: str) -> None:
        with self._incoming_lock:
            held = sum(self._incoming.values())
            if held and held + size > self.dicom.incoming_max_bytes:
                reason, detail = INCOMING_FULL, (f"{held} bytes wait in {self.incoming} "
                                                 f"(dicom.incoming_max_bytes "
                                                 f"{self.dicom.incoming_max_bytes})")
            else:
                try:
                    self.queue.put_nowait((path, source))
                except queue.Full:
                    reason, detail = QUEUE_FULL, (f"{self.queue.maxsize} files wait "
                                                  f"(dicom.queue_files)")
                else:
                    self._incoming[path] = size
                    return
            if source != "watch":
                self.refused[reason] += 1
        raise IngestFull(reason, detail)

    def pause_consumer(self) -> None:
        """Stop taking files from the queue (maintenance, tests); `resume_consumer` undoes."""
        self._resume.clear()

    def resume_consumer(self) -> None:
        self._resume.set()

    def _consume(self) -> None:
        last_complete = 0.0
        while self._leftover and not self._stop.is_set():
            self._ingest(self._leftover.pop(0), "incoming")
        while not self._stop.is_set():
            path = None
            if self._resume.wait(0.2):
                try:
                    path, source = self.queue.get(timeout=0.2)
                except queue.Empty:
                    pass
            if path is not None:
                self._ingest(path, source)
            self._retry_held()
            now = time.time()
            if now - last_complete >= COMPLETE_EVERY_S:
                last_complete = now
                try:
                    self.pipeline.complete_series(quiet_s=self.dicom.series_quiet_s, now=now)
                except Exception:  # noqa: BLE001 - a bad series must not end the ingest thread
                    log.exception("completing series failed")
                if self.on_tick is not None:
                    self.on_tick()  # the site's scorer: it handles its own errors

    def _ingest(self, path: Path, source: str, *, final: bool = False) -> None:
        hold = (TRUNCATED,) if source in _HOLD_SOURCES and not final else ()
        outcome = self.pipeline.ingest_file(path, source=source, consume=True, hold=hold)
        if not path.exists():
            with self._incoming_lock:
                self._incoming.pop(path, None)
        if outcome.status == HELD:
            st = _stat(path)
            if st is not None:
                self._held[path] = _Held(st[0], st[1], time.monotonic())
                log.info("a file from %s reads as truncated; it is read again once it has not "
                         "changed for %.0f s (a writer may still be at it)", source,
                         TRUNCATED_RETRY_S)
        elif outcome.status == "quarantined":
            log.warning("quarantined a file from %s: %s", source, outcome.reason)

    def _retry_held(self) -> None:
        """Read held files again once quiet; a change restarts the wait."""
        now = time.monotonic()
        for path, held in list(self._held.items()):
            st = _stat(path)
            if st is None:
                del self._held[path]
                with self._incoming_lock:
                    self._incoming.pop(path, None)
            elif st != (held.size, held.mtime_ns):
                self._held[path] = _Held(st[0], st[1], now)
            elif now - held.since >= TRUNCATED_RETRY_S:
                del self._held[path]
                self._ingest(path, "watch", final=True)

    # ------------------------------------------------------------------ for training

    def set_imaging(self, imaging: ImagingSpec) -> None:
        self.pipeline.set_imaging(imaging)

    def images_for(self, patient_ids: Sequence[str], imaging: ImagingSpec
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Images of these clinical-table patients, joined by keyed hash of their id.

        Returns (row indices that have an image, float32 [k, depth, size, size])."""
        self.set_imaging(imaging)
        self.pipeline.complete_series(quiet_s=self.dicom.series_quiet_s)
        available = self.pipeline.store.series_for_patients(imaging)
        rows, arrays = [], []
        shape = (imaging.depth, imaging.size, imaging.size)
        for i, pid in enumerate(patient_ids):
            path = available.get(pseudonym(self.secret, pid))
            if path is None:
                continue
            arr = np.load(path, allow_pickle=False)
            if arr.shape == shape and arr.dtype == np.float32:
                rows.append(i)
                arrays.append(arr)
        images = np.stack(arrays) if arrays else np.zeros((0, *shape), np.float32)
        return np.asarray(rows, dtype=np.int64), images

    def status_extra(self) -> dict[str, Any]:
        """Flat counters for the retained site status."""
        s = self.pipeline.summary()
        out: dict[str, Any] = {"ingest_stored": s.get("stored", 0),
                               "ingest_duplicates": s.get("duplicates", 0),
                               "ingest_queue": self.queue.qsize(),
                               "ingest_incoming_bytes": self.incoming_bytes,
                               "ingest_refused_queue_full": self.refused[QUEUE_FULL],
                               "ingest_refused_incoming_full": self.refused[INCOMING_FULL],
                               "ingest_watch_waiting": self._waiting_since is not None,
                               "ingest_quarantine_full": s.get("quarantine_full", 0),
                               "ingest_held_truncated": len(self._held),
                               "series_complete": s.get("series_complete", 0)}
        for group in ("quarantined", "skipped", "series_invalid"):
            counts = s.get(group, {})
            out[f"ingest_{group}"] = sum(counts.values())
            out[f"ingest_{group}_reasons"] = ",".join(f"{k}={v}" for k, v in
                                                      sorted(counts.items()))
        if self.scorer is not None:
            out.update(self.scorer.status_extra())
        return out


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns

"""The ingest pipeline: one DICOM file in, one outcome out; complete series become arrays.

    read (caps first) -> classify (CT/MR only) -> pseudonymise -> duplicate? -> header checks
    -> decode (compressed: in a worker process) -> store pending slices
    complete_series: quiet series -> order/validate -> preprocess to the plan's grid -> store

`ingest_file` never raises for bad input: every problem is an `IngestOutcome` with a PHI-free
reason, and a file that cannot be used is quarantined. Logs name reasons, counts and
pseudonyms only — never an input path (PACS exports put patient names in file names) and
never a DICOM value. This is the composition root of the imaging side: the listener, the
watch folder and `fedsilo ingest` all call it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from agent.config import ImagingSpec
from agent.errors import DataError
from agent.ingest import store as image_store
from agent.ingest.decode_worker import DecodePool
from agent.ingest.deid import Pseudonyms, load_or_create_secret, quiet_pydicom
from agent.ingest.dicom_read import (
    ImageHeader,
    dicomdir_files,
)
from agent.ingest.preprocess import (
    check_positions,
    plane_label,
    preprocess_plane,
    preprocess_planes,
)
from agent.ingest.quarantine import (
    DECODE_CRASHED,
    DECODE_TIMEOUT,
    DEFERRED,
    DUPLICATE,
    HELD,
    INTERNAL_ERROR,
    NOT_A_FILE,
    QUARANTINED,
    SERIES_CLOSED,
    SKIPPED,
    STORE_FAILED,
    STORED,
    Quarantine,
    Rejected,
)
from agent.ingest.reader import read_image
from agent.ingest.series import check_series
from agent.ingest.tree_pool import Result, TreePool
from agent.ops.logsetup import add_private_root

log = logging.getLogger(__name__)

# Series reasons decided here (the geometric ones live in series.py).
MODALITY_MISMATCH = "modality_mismatch"  # e.g. an MR series when the plan's grid is for CT
PENDING_LOST = "pending_lost"  # a pending slice array vanished from disk
PREPROCESS_FAILED = "preprocess_failed"  # the kernels refused the slices (logged by type)
GRID_CHANGED = "grid_changed"  # slices were preprocessed on arrival for another plan's grid
TREE_BATCH = 256  # files per durable commit in ingest_tree
FINISH_BATCH = 32  # completed series made durable together (arrays held meanwhile)
POOL_MIN_FILES = 64  # below this a tree is read in the agent alone

_SOURCE = re.compile(r"[^A-Za-z0-9_.:@-]")


@dataclass(frozen=True)
class IngestOutcome:
    status: str  # "stored" | "duplicate" | "quarantined" | "skipped"
    reason: str | None = None  # PHI-free code for quarantined/skipped


class IngestPipeline:
    """Thread-safe; one instance per state directory and process."""

    def __init__(self, state_dir: Path, imaging: ImagingSpec | None = None, *,
                 kernel_backend: str = "auto", decode_workers: int = 1,
                 decode_timeout_s: float = 60.0, decoder: DecodePool | None = None,
                 tree_workers: int | None = None,
                 quarantine_max_bytes: int | None = None) -> None:
        """`quarantine_max_bytes`: the quarantine's cap (None: none, a one-shot run's own
        tree)."""
        self.state_dir = Path(state_dir)
        self.secret = load_or_create_secret(self.state_dir)
        self.store = image_store.ImageStore(self.state_dir / "images")
        self.quarantine = Quarantine(self.state_dir / "quarantine", quarantine_max_bytes)
        self._own_decoder = decoder is None  # a pool handed in (tests share one) stays open
        self.decoder = decoder or DecodePool(decode_workers, decode_timeout_s)
        self.tree_workers = min(os.cpu_count() or 1, 8) if tree_workers is None \
            else tree_workers
        self._imaging = imaging
        self._kernel_backend = kernel_backend
        self._kernels: Any = None
        self._kernels_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._complete_lock = threading.Lock()
        self._files: Counter[str] = Counter()
        self._reasons: dict[str, Counter[str]] = {QUARANTINED: Counter(), SKIPPED: Counter()}
        # Called with (file, pseudonyms) for each instance stored from a file (not from a tree
        # ingest's reader processes), before the file is consumed; must not raise.
        self.on_stored: Callable[[Path, Pseudonyms], None] | None = None

    # ------------------------------------------------------------------ files

    def ingest_file(self, path: Path, *, source: str = "file", consume: bool = False,
                    hold: Collection[str] = ()) -> IngestOutcome:
        """Ingest one file; `consume` deletes it afterwards (moved, if quarantined). A
        quarantine reason in `hold` leaves the file where it is, uncounted, and answers
        HELD with that reason (the caller retries it later)."""
        path = Path(path)
        source = _SOURCE.sub("_", source)[:64] or "file"
        return self._settle(path, lambda: self._ingest(path, source), source=source,
                            consume=consume, hold=hold)

    def _settle(self, path: Path, work: Callable[[], IngestOutcome], *, source: str,
                consume: bool, hold: Collection[str] = ()) -> IngestOutcome:
        """Run `work` for one file and act on its outcome (quarantine, consume, count)."""
        try:
            with quiet_pydicom():
                outcome = work()
        except Rejected as exc:
            outcome = IngestOutcome(exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one file, not the agent
            log.error("internal error while ingesting a file (%s)", type(exc).__name__)
            outcome = IngestOutcome(QUARANTINED, INTERNAL_ERROR)
        if outcome.status == QUARANTINED and outcome.reason in hold:
            return IngestOutcome(HELD, outcome.reason)
        if outcome.status == QUARANTINED:
            where = self.quarantine.put(path, outcome.reason or INTERNAL_ERROR, consume=consume)
            log.debug("quarantined a file from %s: %s%s", source, outcome.reason,
                     "" if where else " (copy failed, input kept)")
        elif consume and outcome.reason != NOT_A_FILE:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove an ingested file (%s)", type(exc).__name__)
        self._count(outcome)
        return outcome

    def _ingest(self, path: Path, source: str) -> IngestOutcome:
        image = read_image(path, self.secret, known=self.store.has_instance,
                           decode_compressed=self.decoder.decode)
        if image.header is None or image.frames is None:
            return IngestOutcome(DUPLICATE)
        pixels, grid = self._inplane(image.frames, image.header)
        outcome = self._store(image.ids, image.header, pixels, grid, source)
        if outcome.status == STORED and self.on_stored is not None:
            try:  # the file still exists here (agent.results.scoring keeps its references)
                self.on_stored(path, image.ids)
            except Exception as exc:  # noqa: BLE001 - the image is stored; the hook is extra
                log.error("after storing an instance: %s", type(exc).__name__)
        return outcome

    def _store(self, ids: Pseudonyms, header: ImageHeader, pixels: np.ndarray,
               grid: str | None, source: str) -> IngestOutcome:
        try:
            result = self.store.add_instance(ids, header, pixels, received=time.time(),
                                             source=source, grid=grid)
        except (OSError, sqlite3.Error) as exc:
            log.error("could not store an instance (%s)", type(exc).__name__)
            raise Rejected(STORE_FAILED) from None
        if result == image_store.SERIES_CLOSED:
            raise Rejected(SERIES_CLOSED)
        if result == image_store.DUPLICATE:
            return IngestOutcome(DUPLICATE)
        log.debug("stored instance %s of series %s (%d frame(s))", ids.sop[:8], ids.series[:8],
                  header.frames)
        return IngestOutcome(STORED)

    def _inplane(self, pixels: np.ndarray, header: Any) -> tuple[np.ndarray, str | None]:
        """With the plan's grid known, HU + window + in-plane resample now, so the pending
        slice is size x size float32 (a 512 x 512 CT slice shrinks 8x at size 128) and
        completion only resamples depth."""
        imaging = self._imaging
        if imaging is None or header.modality != imaging.modality:
            return pixels, None
        try:
            k = self._load_kernels()
        except Exception:  # noqa: BLE001 - complete_series reports a broken backend
            return pixels, None
        return preprocess_planes(pixels, [(g.slope, g.intercept) for g in header.geometry],
                                 header.modality, imaging, k)

    def _load_kernels(self) -> Any:
        with self._kernels_lock:
            if self._kernels is None:
                import kernels

                self._kernels = kernels.get_backend(self._kernel_backend)
            return self._kernels

    def _count(self, outcome: IngestOutcome) -> None:
        with self._counts_lock:
            self._files[outcome.status] += 1
            if outcome.status in self._reasons:
                self._reasons[outcome.status][outcome.reason or "unknown"] += 1

    def ingest_tree(self, root: Path, *, progress: bool = False,
                    stream: TextIO | None = None) -> dict[str, Any]:
        """Every file under `root` (or a single file; a DICOMDIR file brings the files it
        lists). Symbolic links and hidden files are not followed. Returns `summary()`.

        `root` becomes a private root of the logs: names below it are the exporter's, often
        patients' (agent.ops.logsetup.add_private_root)."""
        root = Path(root)
        add_private_root(root)
        files = _tree_files(root)
        bar = _Progress(len(files), stream or sys.stderr, sum(self._files.values())) \
            if progress else None
        # The files stay where they are, so instances are committed per batch (durable before
        # this returns), not one fsync + commit each.
        real = [f for f in files if f is not None]
        late = self.store.late_duplicates
        with self.store.group(TREE_BATCH), self._readers(len(real)) as pool:
            for path in files:
                if path is None:
                    self._count(IngestOutcome(SKIPPED, NOT_A_FILE))
                elif pool is None or not pool.offer(path):
                    self.ingest_file(path, source="tree")
                if pool is not None:
                    self._take(pool.ready())
                if bar is not None:
                    bar.update(self._files)
            if pool is not None:
                pool.request_commit()
                self.store.commit_group()
                self._take(pool.finish(), bar)
        self._recount_late_duplicates(self.store.late_duplicates - late)
        if bar is not None:
            bar.finish(self._files)
        return self.summary()

    def requeue_quarantine(self, reasons: Collection[str] = ()) -> int:
        """Ingest again the files quarantined under `reasons` (every reason when empty), e.g.
        truncated files whose writer has since finished: each leaves the quarantine, stored,
        or is quarantined anew under the reason it has now. Returns how many were tried."""
        files = self.quarantine.files(reasons)
        for path in files:
            self.ingest_file(path, source="requeue", consume=True)
        if self.quarantine.max_bytes is not None:
            self.quarantine.rescan()
        return len(files)

    def _readers(self, n_files: int) -> contextlib.AbstractContextManager[TreePool | None]:
        """Reader processes for a tree big enough to repay starting them."""
        if self.tree_workers < 2 or n_files < POOL_MIN_FILES:
            return contextlib.nullcontext()
        return TreePool(self.tree_workers - 1, self.state_dir, self._imaging, self._kernel_backend,
                        self.decoder.timeout_s, TREE_BATCH)

    def _recount_late_duplicates(self, n: int) -> None:
        """n files counted as stored turned out, at commit, to be stored already."""
        with self._counts_lock:
            n = min(n, self._files[STORED])
            self._files[STORED] -= n
            self._files[DUPLICATE] += n

    def _take(self, results: Iterator[Result | int], bar: _Progress | None = None) -> None:
        """Count what readers committed; ingest here what they handed back. An int is a
        reader's count of late duplicates among what it just committed."""
        for result in results:
            if isinstance(result, int):
                self._recount_late_duplicates(result)
                continue
            path, status, reason = result
            if status == DEFERRED:
                self.ingest_file(path, source="tree")
            elif status == QUARANTINED and reason in (DECODE_CRASHED, DECODE_TIMEOUT):
                self._settle(path, lambda r=reason: _reject(r), source="tree", consume=False)
            else:
                self._count(IngestOutcome(status, reason))
            if bar is not None:
                bar.update(self._files)

    # ------------------------------------------------------------------ series

    def set_imaging(self, imaging: ImagingSpec) -> None:
        """The plan's grid; series waiting for one are completed at the next call."""
        self._imaging = imaging

    def complete_series(self, *, quiet_s: float, now: float | None = None) -> list[str]:
        """Assemble and preprocess every series quiet for `quiet_s`; returns the pseudonyms
        of the series that became complete (invalid ones are counted in `summary`). Without
        an imaging spec nothing is completed."""
        imaging = self._imaging
        if imaging is None:
            return []
        now = time.time() if now is None else now
        done: list[str] = []
        with self._complete_lock:
            due = self.store.due_series(now, quiet_s)
            if due:
                # A missing or unusable backend is our configuration problem, not the series':
                # it raises here and the series stay pending.
                self._load_kernels()
            finished = []
            for series in due:
                try:
                    reason, n, array = self._assemble(series, imaging)
                except Exception as exc:  # noqa: BLE001 - one bad series must not stop others
                    log.error("series %s failed to preprocess (%s)", series[:8],
                              type(exc).__name__)
                    reason, n, array = PREPROCESS_FAILED, 0, None
                finished.append(image_store.FinishedSeries(
                    series, reason, n, array, imaging if array is not None else None))
                if reason is None:
                    done.append(series)
                log.log(logging.DEBUG if reason is None else logging.INFO,
                        "series %s: %s (%d slices)", series[:8], reason or "complete", n)
                if len(finished) >= FINISH_BATCH:
                    self.store.finish_series(finished, now=now)
                    finished = []
            if finished:
                self.store.finish_series(finished, now=now)
        return done

    def _assemble(self, series: str, imaging: ImagingSpec
                  ) -> tuple[str | None, int, np.ndarray | None]:
        items = self.store.pending_slices(series)
        if not items:
            return PENDING_LOST, 0, None
        if self.store.series_modality(series) != imaging.modality:
            return MODALITY_MISMATCH, len(items), None
        check = check_series([i.geom for i in items],
                             min_slices=2 if imaging.depth > 1 else 1)
        if not check.ok:
            return check.reason, len(check.slices), None
        by_key = {i.geom.key: i for i in items}
        grid = plane_label(imaging)
        ordered = [by_key[check.slices[idx].key] for idx in check.order]
        if any(item.grid not in (None, grid) for item in ordered):
            return GRID_CHANGED, len(ordered), None
        positions = check_positions(check.positions)
        stack = np.empty((len(ordered), imaging.size, imaging.size), dtype=np.float32)
        with contextlib.closing(self.store.load_slices(ordered)) as frames:
            for i, item in enumerate(ordered):
                try:
                    pending = next(frames)
                except (OSError, ValueError, StopIteration):
                    return PENDING_LOST, len(ordered), None
                if item.grid is None:  # stored values: the in-plane step happens now
                    stack[i] = preprocess_plane(pending, item.slope, item.intercept, imaging,
                                                self._kernels, index=i)
                elif pending.shape == stack.shape[1:] and pending.dtype == np.float32:
                    stack[i] = pending
                else:
                    return PENDING_LOST, len(ordered), None
        array = np.asarray(self._kernels.resample_depth(stack, positions, imaging.depth))
        shape = (imaging.depth, imaging.size, imaging.size)
        if array.shape != shape or array.dtype != np.float32 or not np.isfinite(array).all():
            return PREPROCESS_FAILED, len(ordered), None
        return None, len(ordered), array

    # ------------------------------------------------------------------ status

    def summary(self) -> dict[str, Any]:
        """File counts since this pipeline opened; series counts are the store's totals."""
        counts = self.store.counts()
        with self._counts_lock:
            return {
                "stored": self._files[STORED],
                "duplicates": self._files[DUPLICATE],
                "skipped": dict(sorted(self._reasons[SKIPPED].items())),
                "quarantined": dict(sorted(self._reasons[QUARANTINED].items())),
                "series_complete": counts["series"][image_store.COMPLETE],
                "series_invalid": dict(sorted(counts["series_invalid"].items())),
                "series_pending": counts["series"][image_store.PENDING],
                "instances": counts["instances"],
                "quarantine_held": self.quarantine.counts(),
                "quarantine_full": self.quarantine.refused_full,
            }

    def close(self) -> None:
        if self._own_decoder:
            self.decoder.close()
        self.store.close()


def _reject(reason: str) -> IngestOutcome:
    raise Rejected(reason)


def _listed_files(path: Path) -> list[Path]:
    """The files a single file brings when it is a DICOMDIR (known by content, whatever its
    name); what is not followed is said."""
    try:
        with quiet_pydicom():
            listing = dicomdir_files(path)
    except Exception:  # noqa: BLE001 - not readable as DICOM: ingested (and judged) alone
        if path.name.upper() == "DICOMDIR":
            log.warning("could not read a DICOMDIR's file list; ingesting it alone")
        return []
    if listing is None:
        return []
    log.info("the file given is a DICOMDIR: ingesting the %d files it lists",
             len(listing.files))
    if listing.outside or listing.missing:
        log.warning("the DICOMDIR: %d references leave its folder (not followed), %d name files "
                    "that are not there", listing.outside, listing.missing)
    if not listing.records:
        log.warning("a DICOMDIR that lists no files; give the folder instead")
    return listing.files


def _tree_files(root: Path) -> list[Path | None]:
    """Files to ingest, sorted; None stands for a link or special file that is skipped."""
    if root.is_file():
        return [root, *_listed_files(root)]
    if not root.is_dir():
        raise DataError(f"{root}: no such file or directory")
    out: list[Path | None] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            out.append(p if p.is_file() and not p.is_symlink() else None)
    return out


class _Progress:
    """One self-overwriting line on a terminal; one final line elsewhere (log files)."""

    def __init__(self, total: int, stream: TextIO, start: int) -> None:
        self.total, self.stream, self.start = total, stream, start  # start: files counted before
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def _line(self, files: Counter[str]) -> str:
        done = sum(files.values()) - self.start
        return (f"ingest: {done}/{self.total} files, {files[STORED]} stored, "
                f"{files[DUPLICATE]} duplicate, {files[QUARANTINED]} quarantined, "
                f"{files[SKIPPED]} skipped")

    def update(self, files: Counter[str]) -> None:
        now = time.monotonic()
        if self.tty and now - self._last >= 0.1:
            self._last = now
            self.stream.write("\r" + self._line(files))
            self.stream.flush()

    def finish(self, files: Counter[str]) -> None:
        self.stream.write(("\r" if self.tty else "") + self._line(files) + "\n")
        self.stream.flush()

"""The site's local image store: a SQLite index plus .npy arrays under `state_dir/images/`.

    images/index.sqlite        instances (one row per slice) and series (status, reason, array)
    images/pending/<series>.bin  the series' frames as they arrive, appended raw: stored pixel
                               values [r, c], or, when the plan's grid was known on arrival,
                               the in-plane preprocessed slice [size, size] float32
                               (`pending_grid` names the grid); each index row holds its
                               frame's offset, dtype and shape
    images/series/<series>.npy the preprocessed series, float32 [depth, size, size]

Everything here is already de-identified: keys are pseudonyms, geometry is numbers, pixels are
arrays. An instance is appended to its series' pending file (and made durable) before its
index row commits, so a crash leaves at worst bytes no row points at (dropped with the file
when the series completes), never a row without its pixels. One append per slice, one unlink
per series: a file per slice cost more than reading the slice. Arrays are saved and loaded
with allow_pickle=False. The store is thread-safe (one lock, one connection):
the ingest thread adds instances while the training side asks for finished series.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ImagingSpec
from agent.ingest.deid import Pseudonyms
from agent.ingest.dicom_read import ImageHeader
from agent.ingest.series import SliceGeom
from agent.ops.atomic import fsync_dir, write_atomic
from agent.ops.sqlitetx import immediate_tx

PENDING, COMPLETE, INVALID = "pending", "complete", "invalid"
ADDED, DUPLICATE, SERIES_CLOSED = "added", "duplicate", "series_closed"
ORPHAN_AGE_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop TEXT NOT NULL, frame INTEGER NOT NULL,
    series TEXT NOT NULL, study TEXT NOT NULL, patient TEXT NOT NULL, modality TEXT NOT NULL,
    rows INTEGER NOT NULL, columns INTEGER NOT NULL,
    px REAL NOT NULL, py REAL NOT NULL, pz REAL NOT NULL,
    orientation TEXT NOT NULL, spacing_r REAL NOT NULL, spacing_c REAL NOT NULL,
    slope REAL NOT NULL, intercept REAL NOT NULL,
    received REAL NOT NULL, source TEXT NOT NULL, pending_file TEXT, pending_grid TEXT,
    pending_offset INTEGER, pending_dtype TEXT, pending_rows INTEGER, pending_cols INTEGER,
    PRIMARY KEY (sop, frame));
CREATE INDEX IF NOT EXISTS instances_series ON instances(series);
CREATE TABLE IF NOT EXISTS series (
    series TEXT PRIMARY KEY, study TEXT NOT NULL, patient TEXT NOT NULL,
    modality TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'complete', 'invalid')),
    reason TEXT, n_slices INTEGER NOT NULL DEFAULT 0, array_file TEXT, grid TEXT,
    first_received REAL NOT NULL, last_received REAL NOT NULL, completed REAL);
CREATE INDEX IF NOT EXISTS series_status ON series(status);
"""


_INSERT_INSTANCE = ("INSERT INTO instances VALUES "
                    "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_PENDING_COLUMNS = {"pending_grid": "TEXT", "pending_offset": "INTEGER",
                    "pending_dtype": "TEXT", "pending_rows": "INTEGER",
                    "pending_cols": "INTEGER"}
PENDING_DTYPES = frozenset({"<i2", "<u2", "<i4", "<f4"})  # what as_frames / in-plane give
_UPSERT_SERIES = ("INSERT INTO series (series, study, patient, modality, status, first_received, "
                  "last_received) VALUES (?,?,?,?,?,?,?) ON CONFLICT(series) DO UPDATE SET "
                  "last_received = max(last_received, excluded.last_received)")


def grid_label(imaging: ImagingSpec) -> str:
    """The preprocessing a series went through, so a changed plan never mixes grids."""
    return (f"{imaging.modality}:{imaging.depth}x{imaging.size}x{imaging.size}:"
            f"{imaging.window_center:g}/{imaging.window_width:g}")


@dataclass(frozen=True)
class FinishedSeries:
    series: str
    reason: str | None  # None: complete, with `array` made for `imaging`
    n_slices: int
    array: np.ndarray | None = None
    imaging: ImagingSpec | None = None


@dataclass(frozen=True)
class PendingSlice:
    geom: SliceGeom
    slope: float
    intercept: float
    file: str  # name under pending/
    frame: int
    grid: str | None = None  # grid label when the file holds in-plane preprocessed slices
    offset: int | None = None  # where the frame starts in `file`
    dtype: str = "<f4"
    shape: tuple[int, int] = (0, 0)


def save_npy_atomic(path: Path, array: np.ndarray, *, fsync: bool = True) -> None:
    """np.save (no pickle) to a private temp file, fsync (unless the caller syncs a whole
    batch later), rename."""
    write_atomic(path, lambda fh: np.save(fh, array, allow_pickle=False), mode=0o600,
                 fsync=fsync, sync_dir=False)


def append_frames(path: Path, frames: np.ndarray, *, fsync: bool) -> int:
    """Append C-contiguous frames to `path` (created 0600); returns the offset they start at.

    O_APPEND keeps concurrent writers (the daemon and a one-shot `fedsilo ingest`) from
    overwriting each other; the offset is read back from where this write ended."""
    data = memoryview(np.ascontiguousarray(frames)).cast("B")
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to the pending store ({written} of {len(data)} bytes)")
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if fsync and created:
        fsync_dir(path.parent)
    return end - len(data)


def sync_files(directory: Path, names: list[str]) -> None:
    """Make `names` (their contents and their names, renames included) in `directory`
    durable: one fsync per file, then one of the directory.

    Only what this batch wrote is flushed: a syncfs(2) would also wait for every other
    writer on the file system (other tenants, logs), which is their cost, not ours."""
    for name in dict.fromkeys(names):
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Group:
    """Instances written but not yet committed (see `ImageStore.group`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.files: list[str] = []
        self.sops: set[str] = set()
        self.rows: list[tuple[Any, ...]] = []
        self.series: list[tuple[Any, ...]] = []


class _Remover:
    """Deletes files on a background thread: freeing a finished series' pending file (many
    MiB) takes milliseconds, which the next series' assembly can overlap. A file left by a
    crash is unreferenced and removed at the next start."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[list[Path] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def remove(self, paths: list[Path]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fedsilo-store-remove",
                                            daemon=True)
            self._thread.start()
        self._queue.put(paths)

    def _run(self) -> None:
        while (paths := self._queue.get()) is not None:
            for path in paths:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.series_dir = self.root / "series"
        for d in (self.root, self.pending_dir, self.series_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(instances)")}
        for name, kind in _PENDING_COLUMNS.items():  # an index made by an earlier version
            if name not in columns:
                self._db.execute(f"ALTER TABLE instances ADD COLUMN {name} {kind}")
        self._group: _Group | None = None
        # Instances a group commit found already stored by another process (the add said
        # ADDED): callers that count outcomes move that many from stored to duplicate.
        self.late_duplicates = 0
        self._remover = _Remover()
        self._remove_orphans()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_tx(self._db, self._lock)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _remove_orphans(self) -> None:
        """Arrays whose index row never committed (a crash mid-write), and temp files. Only
        old ones: another process (a one-shot `fedsilo ingest`) may be writing right now."""
        referenced = {r[0] for r in self._query(
            "SELECT DISTINCT pending_file FROM instances WHERE pending_file IS NOT NULL")}
        cutoff = time.time() - ORPHAN_AGE_S
        for f in [*self.pending_dir.iterdir(), *self.series_dir.glob(".*")]:
            try:
                if f.name not in referenced and f.stat().st_mtime < cutoff:
                    f.unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------ instances

    def has_instance(self, sop: str) -> bool:
        with self._lock:
            if self._group is not None and sop in self._group.sops:
                return True
            return bool(self._query("SELECT 1 FROM instances WHERE sop = ? LIMIT 1", (sop,)))

    @contextmanager
    def group(self, size: int = 256) -> Iterator[None]:
        """Commit instances added inside in batches of `size`: durable when the batch (or the
        block) ends, not one by one. For callers that keep their input (a tree walk): a crash
        loses at most the uncommitted batch, whose arrays become orphans."""
        with self._lock:
            if self._group is not None:
                raise RuntimeError("store group already open")
            self._group = _Group(max(1, size))
        try:
            yield
        finally:
            with self._lock:
                try:
                    self._flush()
                finally:
                    self._group = None

    def commit_group(self) -> None:
        """Make every instance added in the open group durable now."""
        with self._lock:
            if self._group is None:
                raise RuntimeError("no store group open")
            self._flush()

    def _flush(self) -> None:
        group = self._group
        if group is None or not group.rows:
            return
        files, rows, series = group.files, group.rows, group.series
        group.files, group.rows, group.series, group.sops = [], [], [], set()
        # Bytes appended for rows that never commit stay unreferenced in their series file.
        sync_files(self.pending_dir, sorted(set(files)))
        sops = sorted({r[0] for r in rows})
        with self._tx() as db:
            # Another process (a tree reader, the daemon) may have stored some of these
            # instances meanwhile: its rows stay, ours are ignored and counted as duplicates.
            present = 0
            for i in range(0, len(sops), 500):
                chunk = sops[i:i + 500]
                present += db.execute("SELECT count(DISTINCT sop) FROM instances WHERE sop IN "
                                      f"({','.join('?' * len(chunk))})", chunk).fetchone()[0]
            db.executemany(_INSERT_INSTANCE.replace("INSERT", "INSERT OR IGNORE", 1), rows)
            db.executemany(_UPSERT_SERIES, series)
        self.late_duplicates += present

    def add_instance(self, ids: Pseudonyms, header: ImageHeader, pixels: np.ndarray, *,
                     received: float, source: str, grid: str | None = None) -> str:
        """ADDED, DUPLICATE (this SOP pseudonym is known) or SERIES_CLOSED (its series was
        already completed). `pixels` is [frames, rows, columns] stored values, or [frames,
        size, size] in-plane preprocessed for the grid labelled `grid`."""
        with self._lock:
            if self.has_instance(ids.sop):
                return DUPLICATE
            status = self._query("SELECT status FROM series WHERE series = ?", (ids.series,))
            if status and status[0][0] != PENDING:
                return SERIES_CLOSED
            name = f"{ids.series}.bin"
            group = self._group
            dtype = pixels.dtype.newbyteorder("<").str
            if dtype not in PENDING_DTYPES or pixels.ndim != 3:
                raise ValueError(f"pending frames must be [frames, r, c] of {PENDING_DTYPES}")
            start = append_frames(self.pending_dir / name, pixels.astype(dtype, copy=False),
                                  fsync=group is None)
            step = pixels[0].nbytes if len(pixels) else 0
            _, h, w = pixels.shape
            rows = [(ids.sop, f, ids.series, ids.study, ids.patient, header.modality,
                     header.rows, header.columns, *g.position,
                     ",".join(repr(v) for v in g.orientation), *g.pixel_spacing, g.slope,
                     g.intercept, received, source, name, grid, start + f * step, dtype, h, w)
                    for f, g in enumerate(header.geometry)]
            series = (ids.series, ids.study, ids.patient, header.modality, PENDING, received,
                      received)
            if group is not None:
                group.files.append(name)
                group.sops.add(ids.sop)
                group.rows += rows
                group.series.append(series)
                if len(group.sops) >= group.size:
                    self._flush()
                return ADDED
            try:
                with self._tx() as db:
                    db.executemany(_INSERT_INSTANCE, rows)
                    db.execute(_UPSERT_SERIES, series)
            except sqlite3.IntegrityError:
                return DUPLICATE  # another process stored the same instance a moment ago
            return ADDED

    # ------------------------------------------------------------------ series

    def due_series(self, now: float, quiet_s: float) -> list[str]:
        """Pending series whose newest instance arrived at least `quiet_s` ago."""
        return [r[0] for r in self._query(
            "SELECT series FROM series WHERE status = ? AND last_received <= ? "
            "ORDER BY last_received", (PENDING, now - quiet_s))]

    def series_modality(self, series: str) -> str | None:
        rows = self._query("SELECT modality FROM series WHERE series = ?", (series,))
        return rows[0][0] if rows else None

    def pending_slices(self, series: str) -> list[PendingSlice]:
        out = []
        for r in self._query(
                "SELECT sop, frame, patient, modality, rows, columns, px, py, pz, orientation, "
                "spacing_r, spacing_c, slope, intercept, pending_file, pending_grid, "
                "pending_offset, pending_dtype, pending_rows, pending_cols FROM instances "
                "WHERE series = ? AND pending_file IS NOT NULL ORDER BY received, sop, frame",
                (series,)):
            (sop, frame, patient, modality, rows, cols, px, py, pz, orient, sr, sc, m, b, f, g,
             offset, dtype, h, w) = r
            geom = SliceGeom(key=f"{sop}/{frame}", patient=patient, modality=modality,
                             rows=rows, columns=cols, position=(px, py, pz),
                             orientation=tuple(float(v) for v in orient.split(",")),
                             pixel_spacing=(sr, sc))
            out.append(PendingSlice(geom, m, b, f, frame, g, offset, dtype or "<f4",
                                    (h or 0, w or 0)))
        return out

    def load_slices(self, items: list[PendingSlice]) -> Iterator[np.ndarray]:
        """Each item's pending frame, in order, each pending file opened once. Raises
        OSError/ValueError when a frame is gone or not what its row says."""
        fds: dict[str, int] = {}
        try:
            for item in items:
                # (No offset: a row from before pending files were per series; reported lost.)
                if item.offset is None or item.dtype not in PENDING_DTYPES \
                        or min(item.shape) < 1:
                    raise ValueError("pending row with a bad dtype or shape")
                if item.file not in fds:
                    fds[item.file] = os.open(self.pending_dir / item.file, os.O_RDONLY)
                frame = np.empty(item.shape, dtype=item.dtype)
                view = memoryview(frame).cast("B")
                if os.preadv(fds[item.file], [view], item.offset) != len(view):
                    raise ValueError("pending frame cut short")
                yield frame
        finally:
            for fd in fds.values():
                os.close(fd)

    def finish_series(self, done: list[FinishedSeries], *, now: float) -> None:
        """Mark series complete (with their arrays) or invalid (with a reason), then drop
        their pending pixels: the arrays are written, made durable together (one sync),
        and committed in one transaction."""
        arrays: list[str] = []
        rows = []
        for item in done:
            array_file = None
            if item.reason is None:
                if item.array is None or item.imaging is None:
                    raise ValueError("a complete series needs its array and imaging spec")
                array_file = self.series_array(item.series).name
                save_npy_atomic(self.series_dir / array_file, item.array, fsync=False)
                arrays.append(array_file)
            rows.append((INVALID if item.reason else COMPLETE, item.reason, item.n_slices,
                         array_file, None if item.imaging is None
                         else grid_label(item.imaging), now, item.series))
        if arrays:
            sync_files(self.series_dir, arrays)
        names = [(item.series,) for item in done]
        files = {r[0] for item in done for r in self._query(
            "SELECT DISTINCT pending_file FROM instances WHERE series = ? "
            "AND pending_file IS NOT NULL", (item.series,))}
        with self._tx() as db:
            db.executemany("UPDATE series SET status = ?, reason = ?, n_slices = ?, "
                           "array_file = ?, grid = ?, completed = ? WHERE series = ?", rows)
            db.executemany("UPDATE instances SET pending_file = NULL WHERE series = ?", names)
        self._remover.remove([self.pending_dir / f for f in files])

    def series_for_patients(self, imaging: ImagingSpec | None = None) -> dict[str, Path]:
        """Patient pseudonym -> array of their latest complete series (only series made
        with `imaging`'s grid, when given)."""
        sql = "SELECT patient, array_file FROM series WHERE status = ?"
        args: tuple[Any, ...] = (COMPLETE,)
        if imaging is not None:
            sql += " AND grid = ?"
            args += (grid_label(imaging),)
        out: dict[str, Path] = {}
        for patient, name in self._query(sql + " ORDER BY completed, series", args):
            out[patient] = self.series_dir / name
        return out

    def series_array(self, series: str) -> Path:
        """Where a complete series' preprocessed array is (or will be) saved."""
        return self.series_dir / f"{series}.npy"

    def completed_since(self, since: float, imaging: ImagingSpec, *, after: str = "",
                        limit: int = 500) -> list[tuple[str, str, str, Path, float]]:
        """(series, study, patient, array, completed) of series completed on `imaging`'s grid
        from `since` on, in (completed, series) order, starting after the series `after` of
        that same moment: one page of what the site's scorer may not have seen yet (a
        completion pass stamps a whole batch with one time, hence the second key)."""
        rows = self._query("SELECT series, study, patient, array_file, completed FROM series "
                           "WHERE status = ? AND grid = ? AND (completed > ? OR "
                           "(completed = ? AND series > ?)) ORDER BY completed, series LIMIT ?",
                           (COMPLETE, grid_label(imaging), since, since, after, limit))
        return [(se, st, pa, self.series_dir / name, float(done))
                for se, st, pa, name, done in rows]

    def counts(self) -> dict[str, Any]:
        by_status = dict.fromkeys((PENDING, COMPLETE, INVALID), 0)
        for status, n in self._query("SELECT status, count(*) FROM series GROUP BY status"):
            by_status[status] = n
        invalid = {reason: n for reason, n in self._query(
            "SELECT reason, count(*) FROM series WHERE status = ? GROUP BY reason", (INVALID,))}
        (instances,), = self._query("SELECT count(DISTINCT sop) FROM instances")
        (pending,), = self._query("SELECT count(*) FROM instances WHERE pending_file IS NOT NULL")
        return {"instances": instances, "pending_slices": pending, "series": by_status,
                "series_invalid": invalid}

    def close(self) -> None:
        """Waits for pending files still being removed."""
        self._remover.close()
        with self._lock:
            self._db.close()

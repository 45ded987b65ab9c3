"""Watch folder: the file-drop route into ingest, for PACS or scripts that export to a share.

Why it looks like this:
- Polling, not inotify: it works the same on local disks, NFS and SMB mounts (where inotify
  misses remote writes) and needs no extra dependency. A hospital drop folder sees a few files a
  second at most; one `os.walk` per second is cheap.
- A file is taken only once its size and mtime have stayed the same for `settle_s` seconds of
  observation (not by comparing mtime with our clock, which breaks on file servers whose clock
  is off). Writers that can should write `name.part`/`name.tmp` or a dot-file and rename when
  done: those names are never touched.
- Taken files are *moved* (not copied) into `incoming_dir` under a random name: the drop folder
  empties as work is accepted, and a name chosen by the exporter (often the patient's name) never
  travels further. Across filesystems: copy, fsync, rename into place, then delete the source.
- Size and mtime alone cannot tell a writer that paused from one that finished. On Linux a
  settled file that any process we can see still holds open for writing is left for the next
  poll (`held_for_writing`: one bounded scan of /proc per poll with settled files). Writers we
  cannot see (another host on NFS/SMB, another user) are caught later: a file that reads as
  truncated is retried by the ingest service after a longer quiet period before it is
  quarantined (see service.py).
- Permission errors, files vanishing mid-way and a missing or unmounted folder are logged once
  and retried; the thread never dies of them.
- Names below the folder are PHI (exporters name folders and files after patients): our
  messages never name a file or sub-folder ("a file in the watch folder"; a taken file by the
  random name it gets), and the folder is registered as a private root of the logs
  (`agent.ops.logsetup.add_private_root`), so what an exception message quotes from below it
  is redacted too. The folder itself is named: IT configured it.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.ops.atomic import fsync_dir
from agent.ops.logsetup import add_private_root

log = logging.getLogger(__name__)

OnFile = Callable[[Path, str], None]
SOURCE = "watch"
DICOM_SUFFIX = ".dcm"  # files in incoming_dir: random name + this suffix, from either route
IGNORED_SUFFIXES = (".part", ".tmp")
RETRY_AFTER_S = 30.0
_COPY_CHUNK = 1 << 20
PROC_SCAN_BUDGET_S = 0.5  # the /proc scan gives up (files taken on size/mtime) past this


def is_ignored(name: str) -> bool:
    """Hidden files and files still being written under a temporary name are left alone."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time this (size, mtime) was first observed


class WatchFolder:
    """Moves settled files from `watch_dir` (and its subfolders) into `incoming_dir`.

    `on_file(new_path, "watch")` is called from the watch thread once per file, after the move.
    """

    def __init__(self, watch_dir: Path, incoming_dir: Path, on_file: OnFile, *,
                 poll_s: float = 1.0, settle_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if poll_s <= 0 or settle_s < 0:
            raise ValueError("poll_s must be > 0 and settle_s >= 0")
        self.watch_dir = Path(watch_dir)
        add_private_root(self.watch_dir)  # names below it are patients' (module docstring)
        self.incoming_dir = Path(incoming_dir)
        self.on_file = on_file
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.moved = 0
        self._clock = clock
        self._seen: dict[Path, _Seen] = {}
        self._retry_at: dict[Path, float] = {}
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the polling thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fedsilo-watch", daemon=True)
        self._thread.start()
        log.info("watch folder %s: polling every %.1f s, files settle after %.1f s",
                 self.watch_dir, self.poll_s, self.settle_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current poll; a file being moved is finished first."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("watch folder thread did not stop within %.0f s", timeout)

    def __enter__(self) -> WatchFolder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug here must not end ingest: log, keep polling
                log.exception("watch folder %s: poll failed", self.watch_dir)
            self._stop.wait(self.poll_s)

    # ---------------------------------------------------------------------------------- polling

    def poll_once(self) -> int:
        """One pass over the folder; returns how many files were handed over."""
        now = self._clock()
        present: set[Path] = set()
        settled: list[tuple[Path, _Seen]] = []
        handed = 0
        for path in self._scan():
            if self._stop.is_set():
                break
            present.add(path)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._warn_once(f"stat:{path}", "watch folder: cannot stat a file (%s)",
                                _why(exc))
                continue
            if not stat.S_ISREG(st.st_mode):  # symlinks, fifos, sockets: never follow or move
                continue
            prev = self._seen.get(path)
            if prev is None or (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)
                continue
            if now - prev.since < self.settle_s or self._retry_at.get(path, now) > now:
                continue
            settled.append((path, prev))
        writing = held_for_writing([p for p, _ in settled]) if settled else set()
        for path, prev in settled:
            if self._stop.is_set():
                break
            if path in writing:
                if now - prev.since >= RETRY_AFTER_S:
                    self._warn_once(f"open:{path}", "watch folder: a file has not changed for "
                                    "%.0f s but a process still holds it open for writing; it "
                                    "is taken once closed", now - prev.since)
                continue
            handed += self._take(path, prev, now)
        for gone in self._seen.keys() - present:
            del self._seen[gone]
            self._retry_at.pop(gone, None)
        return handed

    def _scan(self) -> Iterator[Path]:
        """Every candidate file below `watch_dir`, skipping hidden folders and `incoming_dir`."""
        incoming = _resolved(self.incoming_dir)

        def onerror(exc: OSError) -> None:
            where = exc.filename or self.watch_dir
            what = "it" if os.fspath(where) == os.fspath(self.watch_dir) else "a sub-folder of it"
            self._warn_once(f"walk:{where}", "watch folder %s: cannot read %s (%s)",
                            self.watch_dir, what, _why(exc))

        for root, dirs, files in os.walk(self.watch_dir, onerror=onerror):
            dirs[:] = [d for d in dirs if not d.startswith(".")
                       and _resolved(Path(root, d)) != incoming]
            for name in files:
                if not is_ignored(name):
                    yield Path(root, name)

    def _take(self, path: Path, seen: _Seen, now: float) -> int:
        """Move one settled file into `incoming_dir` and hand it over; 1 if handed over."""
        dest = self.incoming_dir / f"{secrets.token_hex(16)}{DICOM_SUFFIX}"
        try:
            st = os.lstat(path)
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)  # still growing
                return 0
            self.incoming_dir.mkdir(parents=True, exist_ok=True)  # recreated if cleaned away
            move_file(path, dest)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not os.path.lexists(path):
                log.debug("watch folder: a file vanished before it could be moved")
                self._seen.pop(path, None)
                return 0
            self._retry_at[path] = now + max(RETRY_AFTER_S, self.settle_s)
            self._warn_once(f"move:{path}", "watch folder: cannot move a file into %s (%s); "
                            "will retry every %.0f s", self.incoming_dir, _why(exc),
                            RETRY_AFTER_S)
            return 0
        self._seen.pop(path, None)
        self._retry_at.pop(path, None)
        self.moved += 1
        log.info("watch folder: took %d bytes as %s", seen.size, dest.name)
        try:
            self.on_file(dest, SOURCE)
        except Exception as exc:  # the file stays in incoming_dir for the agent to find again
            log.error("watch folder: ingest queue refused %s (%s)", dest.name,
                      type(exc).__name__)
        return 1

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        """A stuck file or unreadable folder is reported once, not once per poll."""
        if key in self._warned:
            log.debug(msg, *args)
            return
        if len(self._warned) > 10_000:
            self._warned.clear()
        self._warned.add(key)
        log.warning(msg, *args)


def held_for_writing(paths: list[Path], budget_s: float = PROC_SCAN_BUDGET_S) -> set[Path]:
    """Those of `paths` that a process visible in /proc holds open for writing (Linux).

    One pass over /proc/*/fd, reading link names only (no stat on other processes' files, so a
    hung network mount elsewhere cannot block it), bounded by `budget_s`; empty where /proc is
    missing or when the budget runs out (the caller then goes by size and mtime alone)."""
    wanted: dict[str, Path] = {}
    for p in paths:
        wanted[os.path.realpath(p)] = p
    found: set[Path] = set()
    deadline = time.monotonic() + budget_s
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if time.monotonic() > deadline:
            log.debug("watch folder: /proc scan over budget; going by size and mtime")
            return set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            path = wanted.get(target)
            if path is not None and _open_for_writing(pid, fd):
                found.add(path)
    return found


def _open_for_writing(pid: str, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    except (OSError, ValueError, IndexError):
        pass
    return False


def move_file(src: Path, dest: Path) -> None:
    """Move `src` to `dest` so that `dest` appears whole or not at all, then `src` is gone."""
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(src, dest)
    fsync_dir(dest.parent)


def _copy_across(src: Path, dest: Path) -> None:
    """Copy, fsync, rename into place, then delete the source (undo `dest` if that fails)."""
    tmp = dest.with_name(f".{dest.stem}.part")
    try:
        with open(src, "rb") as fi, open(tmp, "xb") as fo:
            shutil.copyfileobj(fi, fo, _COPY_CHUNK)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dest)
    except BaseException:
        unlink_quietly(tmp)
        raise
    try:
        os.unlink(src)
    except OSError:
        unlink_quietly(dest)  # not handed over yet: better than ingesting it twice
        raise


def _why(exc: OSError) -> str:
    """An OSError's reason without its file names (`str(exc)` quotes the paths)."""
    return exc.strerror or type(exc).__name__


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def unlink_quietly(path: Path) -> None:
    """Cleanup on an error path must not hide the original error."""
    try:
        os.unlink(path)
    except OSError:
        pass

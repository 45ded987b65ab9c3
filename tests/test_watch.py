"""Watch folder: settling, moving once, subfolders, ignored names, and surviving a hostile disk.

Deterministic tests drive `poll_once()` with a fake clock; the others run the real thread with
short poll/settle times and wait on conditions (never fixed sleeps for the result).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.ingest import watch as watch_mod
from agent.ingest.watch import WatchFolder, is_ignored, move_file

POLL_S = 0.03
SETTLE_S = 0.5


class Calls:
    def __init__(self, fail: bool = False) -> None:
        self.items: list[tuple[Path, str]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, path: Path, source: str) -> None:
        with self._lock:
            self.items.append((path, source))
        if self.fail:
            raise RuntimeError("queue full")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    watch, incoming = tmp_path / "drop", tmp_path / "incoming"
    watch.mkdir()
    return watch, incoming


@pytest.fixture
def running(dirs):
    """A started WatchFolder with short timings; always stopped, thread checked gone."""
    watch, incoming = dirs
    calls = Calls()
    wf = WatchFolder(watch, incoming, calls, poll_s=POLL_S, settle_s=SETTLE_S)
    wf.start()
    thread = wf._thread
    try:
        yield wf, watch, incoming, calls
    finally:
        wf.stop()
        assert thread is not None and not thread.is_alive()


def files_in(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


# ------------------------------------------------------------------------- deterministic


def test_slow_writer_is_not_taken_before_the_file_settles(dirs):
    watch, incoming = dirs
    clock, calls = Clock(), Calls()
    wf = WatchFolder(watch, incoming, calls, poll_s=1.0, settle_s=2.0, clock=clock)
    f = watch / "slice.dcm"
    f.write_bytes(b"part one;")
    assert wf.poll_once() == 0                # first sighting
    clock.now += 1.5
    assert wf.poll_once() == 0                # unchanged, but only 1.5 s
    with f.open("ab") as fh:                  # the writer goes on after its pause
        fh.write(b"part two")
    clock.now += 1.0                          # 2.5 s since first sighting, 0 since the change
    assert wf.poll_once() == 0
    clock.now += 1.9
    assert wf.poll_once() == 0 and f.exists() and calls.items == []
    clock.now += 0.2                          # 2.1 s without change: settled
    assert wf.poll_once() == 1
    assert not f.exists()
    [(path, source)] = calls.items
    assert source == "watch" and path.parent == incoming
    assert path.read_bytes() == b"part one;part two"
    clock.now += 10
    assert wf.poll_once() == 0 and len(calls.items) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_settled_file_still_open_for_writing_is_not_taken(dirs, caplog):
    # Issue 17.7: a writer pausing longer than settle_s had its file moved from under it.
    watch, incoming = dirs
    clock, calls = Clock(), Calls()
    wf = WatchFolder(watch, incoming, calls, poll_s=1.0, settle_s=2.0, clock=clock)
    f = watch / "slice.dcm"
    with f.open("wb") as writer:  # this process is the writer: visible in /proc/self/fd
        writer.write(b"half")
        writer.flush()
        assert wf.poll_once() == 0
        for _ in range(4):
            clock.now += 10.0  # settled by size and mtime long ago
            assert wf.poll_once() == 0 and f.exists()
        assert "still holds it open for writing" in caplog.text
        writer.write(b" and the rest")
    clock.now += 1.0
    assert wf.poll_once() == 0  # changed on close: settles afresh
    clock.now += 2.5
    assert wf.poll_once() == 1 and calls.items[0][0].read_bytes() == b"half and the rest"


def test_missing_incoming_dir_is_recreated_not_mistaken_for_a_vanished_file(dirs):
    """Regression: a FileNotFoundError from a missing *destination* dropped the file silently."""
    watch, incoming = dirs
    clock, calls = Clock(), Calls()
    wf = WatchFolder(watch, incoming, calls, poll_s=1.0, settle_s=1.0, clock=clock)
    assert not incoming.exists()
    (watch / "a.dcm").write_bytes(b"a")
    wf.poll_once()
    clock.now += 1.5
    assert wf.poll_once() == 1 and calls.items[0][0].read_bytes() == b"a"


def test_permission_error_is_logged_once_and_retried(dirs, monkeypatch, caplog):
    watch, incoming = dirs
    clock, calls = Clock(), Calls()
    wf = WatchFolder(watch, incoming, calls, poll_s=1.0, settle_s=1.0, clock=clock)
    (watch / "a.dcm").write_bytes(b"x" * 10)
    real_move, failures = move_file, []

    def flaky(src: Path, dest: Path) -> None:
        if len(failures) < 2:
            failures.append(src)
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real_move(src, dest)

    monkeypatch.setattr(watch_mod, "move_file", flaky)
    caplog.set_level(logging.WARNING, logger="agent.ingest.watch")
    wf.poll_once()
    clock.now += 1.5
    assert wf.poll_once() == 0                       # first failure
    clock.now += 1.0
    assert wf.poll_once() == 0 and len(failures) == 1  # backing off, not hammering
    clock.now += watch_mod.RETRY_AFTER_S
    assert wf.poll_once() == 0 and len(failures) == 2
    clock.now += watch_mod.RETRY_AFTER_S
    assert wf.poll_once() == 1 and len(calls.items) == 1
    assert len([m for m in caplog.messages if "cannot move" in m]) == 1


def test_cross_filesystem_move_copies_fsyncs_and_removes_source(dirs, monkeypatch):
    watch, incoming = dirs
    incoming.mkdir()
    src = watch / "big.dcm"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    real_replace = os.replace

    def no_cross_device(a, b):
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(a, b)

    monkeypatch.setattr(watch_mod.os, "replace", no_cross_device)
    dest = incoming / "x.dcm"
    move_file(src, dest)
    assert dest.read_bytes() == payload and not src.exists()
    assert [p.name for p in incoming.iterdir()] == ["x.dcm"]   # no .part left behind


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_real_cross_filesystem_move(tmp_path):
    shm_dir = Path("/dev/shm") / f"fedsilo-test-{os.getpid()}"
    shm_dir.mkdir()
    try:
        if os.stat(shm_dir).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm and tmp are one filesystem here")
        src = shm_dir / "a.dcm"
        src.write_bytes(b"dicom-ish")
        move_file(src, tmp_path / "b.dcm")
        assert (tmp_path / "b.dcm").read_bytes() == b"dicom-ish" and not src.exists()
    finally:
        for p in shm_dir.iterdir():
            p.unlink()
        shm_dir.rmdir()


def test_ignored_names():
    for name in (".hidden.dcm", "scan.part", "scan.PART", "scan.tmp", "scan.Tmp", ".x"):
        assert is_ignored(name), name
    for name in ("scan.dcm", "IM0001", "part", "tmp.dcm", "DICOMDIR"):
        assert not is_ignored(name), name


# ---------------------------------------------------------------------------- threaded


def test_slow_writer_with_pause_on_the_real_thread(running):
    wf, watch, incoming, calls = running
    f = watch / "slow.dcm"
    with f.open("wb") as fh:
        fh.write(b"A" * 1000)
        fh.flush()
        time.sleep(SETTLE_S * 0.3)                     # pause well under settle_s
        assert f.exists() and calls.items == []        # not taken mid-write
        fh.write(b"B" * 1000)
    assert wait_for(lambda: len(calls.items) == 1)
    [(path, source)] = calls.items
    assert source == "watch" and path.read_bytes() == b"A" * 1000 + b"B" * 1000
    assert not f.exists()


def test_finished_files_in_subfolders_are_moved_once(running):
    wf, watch, incoming, calls = running
    (watch / "study1" / "series2").mkdir(parents=True)
    names = {watch / "top.dcm": b"1", watch / "study1" / "DOE^JOHN.dcm": b"22",
             watch / "study1" / "series2" / "IM0001": b"333"}
    for p, data in names.items():
        p.write_bytes(data)
    assert wait_for(lambda: len(calls.items) == 3)
    time.sleep(SETTLE_S + 5 * POLL_S)                  # more polls: still exactly once each
    assert len(calls.items) == 3 and wf.moved == 3
    moved = [p for p, _ in calls.items]
    assert sorted(p.read_bytes() for p in moved) == sorted(names.values())
    assert all(p.parent == incoming and p.suffix == ".dcm" for p in moved)
    assert not any("DOE" in p.name or "IM0001" in p.name for p in moved)  # no exporter names
    assert files_in(watch) == [] and (watch / "study1" / "series2").is_dir()
    assert sorted(files_in(incoming)) == sorted(moved)


def test_hidden_and_temporary_files_are_left_alone_until_renamed(running):
    wf, watch, incoming, calls = running
    (watch / ".staging").mkdir()
    keep = [watch / ".hidden.dcm", watch / "scan.part", watch / "scan2.tmp",
            watch / ".staging" / "inner.dcm"]
    for p in keep:
        p.write_bytes(b"x")
    time.sleep(SETTLE_S + 5 * POLL_S)
    assert calls.items == [] and all(p.exists() for p in keep)
    os.rename(watch / "scan.part", watch / "scan.dcm")  # the writer's "done" signal
    assert wait_for(lambda: len(calls.items) == 1)
    assert calls.items[0][0].read_bytes() == b"x"


def test_vanished_file_does_not_stop_the_thread(running, monkeypatch):
    wf, watch, incoming, calls = running
    real_move = move_file
    vanished = []

    def delete_first(src: Path, dest: Path) -> None:
        if not vanished:                               # another process takes it mid-way
            vanished.append(src)
            os.unlink(src)
        real_move(src, dest)

    monkeypatch.setattr(watch_mod, "move_file", delete_first)
    (watch / "gone.dcm").write_bytes(b"a")
    assert wait_for(lambda: bool(vanished))
    (watch / "later.dcm").write_bytes(b"b")
    assert wait_for(lambda: len(calls.items) == 1)
    assert calls.items[0][0].read_bytes() == b"b"
    assert wf._thread is not None and wf._thread.is_alive()


def test_files_deleted_before_settling_are_forgotten(running):
    wf, watch, incoming, calls = running
    f = watch / "brief.dcm"
    f.write_bytes(b"a")
    assert wait_for(lambda: f in wf._seen)
    f.unlink()
    assert wait_for(lambda: f not in wf._seen)
    assert calls.items == [] and wf._thread.is_alive()


def test_missing_watch_folder_is_waited_for(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="agent.ingest.watch")
    watch, calls = tmp_path / "not-mounted-yet", Calls()
    wf = WatchFolder(watch, tmp_path / "incoming", calls, poll_s=POLL_S, settle_s=SETTLE_S)
    wf.start()
    try:
        assert wait_for(lambda: any("cannot read" in m for m in caplog.messages))
        watch.mkdir()
        (watch / "a.dcm").write_bytes(b"a")
        assert wait_for(lambda: len(calls.items) == 1)
        assert len([m for m in caplog.messages if "cannot read" in m]) == 1
    finally:
        wf.stop()


def test_incoming_inside_the_watch_folder_is_not_rescanned(tmp_path):
    watch = tmp_path / "drop"
    incoming = watch / "incoming"
    watch.mkdir()
    calls = Calls()
    wf = WatchFolder(watch, incoming, calls, poll_s=POLL_S, settle_s=SETTLE_S)
    wf.start()
    try:
        (watch / "a.dcm").write_bytes(b"a")
        assert wait_for(lambda: len(calls.items) == 1)
        time.sleep(SETTLE_S + 5 * POLL_S)
        assert len(calls.items) == 1 and len(files_in(incoming)) == 1
    finally:
        wf.stop()


def test_queue_refusal_keeps_the_file_and_the_thread(dirs):
    watch, incoming = dirs
    calls = Calls(fail=True)
    wf = WatchFolder(watch, incoming, calls, poll_s=POLL_S, settle_s=SETTLE_S)
    wf.start()
    try:
        (watch / "a.dcm").write_bytes(b"a")
        (watch / "b.dcm").write_bytes(b"b")
        assert wait_for(lambda: len(calls.items) == 2)
        assert len(files_in(incoming)) == 2            # kept for the agent's restart rescan
        assert wf._thread.is_alive()
    finally:
        wf.stop()

"""The state directory as an operator sees it fail: full disk or not writable, in one line.

Both roles keep everything that must survive a crash under their `state_dir`. When writing
there fails, the process must say so plainly (one log line, a status reason), keep what it
has in memory, and try again, instead of ending in a traceback or dropping state silently.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import IO

from agent.errors import ConfigError, FedsiloError

DISK_FULL = "disk_full"
NOT_WRITABLE = "state_not_writable"
IO_ERROR = "state_io_error"


class StateError(FedsiloError):
    """The state directory cannot be written; `code` is the status reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def error_code(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return NOT_WRITABLE
    return IO_ERROR


def describe(path: Path, exc: OSError) -> StateError:
    """A StateError for a failed write under the state directory, naming what to do."""
    code = error_code(exc)
    why = exc.strerror or str(exc)
    hint = {DISK_FULL: "free space there", NOT_WRITABLE: "give this service write access"}
    where = exc.filename if isinstance(exc.filename, str) else str(path)
    return StateError(code, f"cannot write state in {path} ({where}: {why}; {code}); "
                            f"{hint.get(code, 'check the disk')}")


def ensure_writable(path: Path) -> None:
    """Create the state directory if needed and prove it takes a durable write, at start: a
    read-only or full state directory is refused before anything is attempted."""
    path = Path(path)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"fedsilo")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise describe(path, exc) from None


AGENT_LOCK = "agent.lock"


def hold_agent_lock(path: Path, source: str) -> IO[str]:
    """Hold `path`/agent.lock for this process's life (the kernel releases it at exit, a
    crash included); ConfigError when another agent holds it. Why: two agents on one state
    directory would each take the other's MQTT session and overwrite each other's state, and
    `fedsilo doctor` must know whether the agent runs before it opens that session itself."""
    lock = open(Path(path) / AGENT_LOCK, "a+")  # noqa: SIM115 - held until the agent stops
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise ConfigError(source, "site.state_dir", f"another fedsilo agent (pid {pid}) already "
                          f"runs with {path}; two agents must not share a state directory"
                          ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def agent_lock_holder(path: Path) -> str | None:
    """The pid (as written) of the agent holding `path`/agent.lock, or None when none runs;
    OSError when the lock exists but cannot be read (another user's state directory)."""
    try:
        lock = open(Path(path) / AGENT_LOCK)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None  # no agent ever started here
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "?"
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None

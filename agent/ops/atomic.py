"""Crash-safe file writes: write a temp file, fsync, rename, fsync the directory.

After a power cut a reader sees either the old file or the new one, never half of each; the
coordinator's checkpoint and the site's state rely on this.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a directory be fsync'ed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *, mode: int = 0o640,
                 fsync: bool = True, sync_dir: bool = True) -> None:
    """Write through `write(file)` to a private temp name, fsync, rename, fsync the directory.

    `fsync=False`/`sync_dir=False` are for callers that make a whole batch durable at once.
    The parent directory must exist: a vanished directory is the caller's error to report."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: fh.write(data), mode=mode)


def write_json_atomic(path: Path, doc: Any) -> None:
    write_bytes_atomic(path, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode())

"""One write transaction on a connection shared by threads (the store, the result books).

BEGIN IMMEDIATE takes SQLite's write lock at the start, so a second process (a one-shot
`fedsilo ingest` beside the daemon) waits for it instead of failing to upgrade a read lock
half-way; the thread lock keeps this process's threads off the one connection meanwhile.
The connection must be opened with isolation_level=None (we issue BEGIN ourselves).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate_tx(db: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

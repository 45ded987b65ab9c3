"""Deterministic crash points for the crash tests: `kill -9` at an exact moment, on demand.

A test sets `FEDSILO_TEST_CRASH_AT=name` (or `name:k`, the k-th time that point is reached)
in one process's environment; when the code reaches `crash_point(name)` that process kills
itself with SIGKILL, exactly as an operator's `kill -9` or a power cut would end it: no
`finally`, no atexit, no flush. Without the variable (every real deployment) a crash point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import Callable

ENV = "FEDSILO_TEST_CRASH_AT"
_hits: Counter[str] = Counter()


def armed(name: str) -> bool:
    """Whether the next `crash_point(name)` kills this process."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    point, _, nth = spec.partition(":")
    if point != name:
        return False
    return _hits[name] + 1 == (int(nth) if nth.isascii() and nth.isdigit() else 1)


def crash_point(name: str, before: Callable[[], object] | None = None) -> None:
    """SIGKILL this process here when the test environment asks for it; `before` runs first
    (e.g. waiting for the broker to acknowledge what was just published)."""
    if not os.environ.get(ENV):
        return
    if armed(name):
        if before is not None:
            before()
        sys.stderr.write(f"crash point {name}: killing this process\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    _hits[name] += 1

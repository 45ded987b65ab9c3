"""Logging is configured once, here, at the entry point; library modules only get loggers.

Lines are journald-friendly (no timestamps of our own under systemd, which adds them) and
third-party chatter that could echo raw values (pydicom warnings) is routed away from them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(level: str = "INFO", *, stream=None) -> None:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)
    logging.getLogger("numba").setLevel(logging.WARNING)
    # pydicom warnings can quote element values (patient data): never let them reach a log.
    warnings.filterwarnings("ignore", module="pydicom")

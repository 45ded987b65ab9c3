"""Logging is configured once, here, at the entry point; library modules only get loggers.

Lines are journald-friendly: under systemd (JOURNAL_STREAM set) each line starts with its
syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) so `journalctl -p` works,
and carries no timestamp of its own (journald adds one). Third-party chatter that could echo raw
values (pydicom warnings) is routed away, and a redaction filter guards every line: DICOM
patient attributes, long encoded runs that look like payload bytes, and over-long messages are
cut before anything is written. Our own code logs topics, sizes and reasons, never payloads or
DICOM values; the filter is the second line of defence.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_PATIENT_KEYS = re.compile(
    r"(?i)\b(Patient(?:Name|ID|BirthDate|Address|TelephoneNumbers|MotherBirthName)|"
    r"OtherPatient(?:IDs|Names)|AccessionNumber|ReferringPhysicianName|InstitutionName)"
    r"(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|[^,;\s)]+)")
_DICOM_PATIENT_TAG = re.compile(r"\(0010,\s*[0-9A-Fa-f]{4}\)[^\n,;]*")
_ENCODED_RUN = re.compile(r"[A-Za-z0-9+/=]{96,}|(?:\\x[0-9a-f]{2}){16,}")
_BYTES_REPR = re.compile(r"b'[^']{40,}'|b\"[^\"]{40,}\"")
MAX_MESSAGE = 4000
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def redact(text: str) -> str:
    """What must never reach a log, cut out of a line (see the module docstring)."""
    text = _PATIENT_KEYS.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)
    text = _DICOM_PATIENT_TAG.sub("(0010,xxxx) [redacted]", text)
    text = _BYTES_REPR.sub("[bytes redacted]", text)
    text = _ENCODED_RUN.sub("[payload redacted]", text)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f"... [{len(text) - MAX_MESSAGE} characters cut]"
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


class JournaldFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def setup_logging(level: str = "INFO", *, stream=None) -> None:
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JournaldFormatter(fmt) if under_journald else logging.Formatter(fmt, "%H:%M:%S")
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paho").setLevel(logging.WARNING)
    logging.getLogger("numba").setLevel(logging.WARNING)
    # pydicom warnings can quote element values (patient data): never let them reach a log.
    warnings.filterwarnings("ignore", module="pydicom")

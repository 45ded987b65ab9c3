"""Logging is configured once, here, at the entry point; library modules only get loggers.

Lines are journald-friendly: under systemd (JOURNAL_STREAM set) each line starts with its
syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) so `journalctl -p` works,
and carries no timestamp of its own (journald adds one). Third-party chatter that could echo raw
values (pydicom warnings) is routed away, and a redaction filter guards every line (ours and
those pydicom and pynetdicom log, which propagate to the same handler): DICOM patient
attributes, the values pydicom and pynetdicom quote in their own warnings ("Invalid value for
VR UI: ...", "Non-conformant '...' value ..."), any other dotted UID, long encoded runs that
look like payload bytes, and over-long messages are cut before anything is written. Our own
code logs topics, sizes and reasons, never payloads or DICOM values; the filter is the second
line of defence.
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
# pydicom and pynetdicom quote the offending value: "Invalid value for VR UI: '...'",
# "Non-conformant 'Affected SOP Instance UID' value '...'", "Invalid 'X' value '...' - ...".
_VR_VALUE = re.compile(r"(Invalid value for VR [A-Z]{2}: )(b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|"
                       r"\\.)*\"|\S+?(?=\.?(?:\s|$)))")
_NAMED_VALUE = re.compile(r"((?:Non-conformant|Invalid) '[^'\n]{1,80}' value )'[^'\n]*'")
# A dotted UID anywhere (an instance UID can name a patient's study); not a version number or
# an IPv4 address (up to four short parts), and not the standard's own UIDs (SOP classes,
# transfer syntaxes), which say what was wrong.
_UID = re.compile(r"(?<![\w.])[0-2](?:\.\d+){2,}[\w.]*")
_STANDARD_UID = "1.2.840.10008."
MAX_MESSAGE = 4000
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def redact(text: str) -> str:
    """What must never reach a log, cut out of a line (see the module docstring)."""
    text = _PATIENT_KEYS.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)
    text = _DICOM_PATIENT_TAG.sub("(0010,xxxx) [redacted]", text)
    text = _VR_VALUE.sub(lambda m: f"{m.group(1)}[redacted]", text)
    text = _NAMED_VALUE.sub(lambda m: f"{m.group(1)}[redacted]", text)
    text = _UID.sub(_uid, text)
    text = _BYTES_REPR.sub("[bytes redacted]", text)
    text = _ENCODED_RUN.sub("[payload redacted]", text)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f"... [{len(text) - MAX_MESSAGE} characters cut]"
    return text


def _uid(m: re.Match[str]) -> str:
    value = m.group(0).rstrip(".")
    parts = value.split(".")
    short = len(parts) <= 4 and all(p.isdigit() and len(p) <= 3 for p in parts)
    if short or value.startswith(_STANDARD_UID):  # a version, an IPv4 address; the standard's
        return m.group(0)
    return "[uid redacted]" + m.group(0)[len(value):]


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

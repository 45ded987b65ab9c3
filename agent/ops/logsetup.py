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

Tracebacks (`log.exception`, `exc_info=`) and `stack_info` are redacted too: exception messages
quote paths and values (`PermissionError: ... '/srv/inbox/DOE^JOHN/CT/1.dcm'`). Redaction
happens when the record is made (a log-record factory chained in by `setup_logging`), so every
handler sees the redacted record, not only ours: pytest's caplog, a handler a library adds. The
traceback is formatted then, redacted, and kept in `record.exc_text`; `logging.Formatter.format`
only formats `exc_info` itself while `exc_text` is empty, so the raw text is never made again.
`RedactingFilter` on our handler does the same for records made elsewhere (before
`setup_logging`, or by `logging.makeLogRecord`). Uncaught exceptions, in the main thread or any
other, go through logging as well instead of straight to stderr.

Private roots: folders whose contents are named by the outside world. A PACS export or a
scanner share names folders and files after patients (`/srv/inbox/DOE^JOHN/CT/1.dcm`).
`add_private_root` registers such a folder; any occurrence of it followed by a sub-path (up to
a quote, a newline or the end of the text) becomes `<label>/[path redacted]`: the root stays
readable (IT configured it), what is below it never reaches a log. The watch folder registers
itself when it starts; `IngestPipeline.ingest_tree` (`fedsilo ingest`) registers the tree it
reads. The clinical table's folder is not registered: the table's path is configuration chosen
by IT, the agent never logs a cell value, and redacting it would hide which file a
"kept N of M rows" line is about.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

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
MAX_TRACEBACK = 16000  # a traceback keeps its end (the exception) when cut
PATH_REDACTED = "[path redacted]"
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


_roots_lock = threading.Lock()
_roots: dict[str, str] = {}  # root as it may be written -> label
_roots_re: re.Pattern[str] | None = None


def add_private_root(path: str | os.PathLike[str], label: str | None = None) -> None:
    """Register a folder whose sub-paths name patients (a watch folder, an ingested tree).

    Anything below it is logged as `<label>/[path redacted]`; `label` defaults to the folder as
    given. A file registers the folder it is in. The folder is matched as given and resolved
    (symbolic links, relative paths). Idempotent; the file system root is refused (it would
    redact every absolute path, the state directory's too)."""
    global _roots_re
    given = Path(path)
    if given.is_file():
        given = given.parent
    forms = {os.path.normpath(os.fspath(given)), os.path.abspath(given),
             os.path.realpath(given)}
    text = label if label is not None else os.path.normpath(os.fspath(given))
    with _roots_lock:
        for form in forms:
            if form.strip("/"):
                _roots.setdefault(form, text)
        # Longest first: a registered root inside another one keeps its own label.
        ordered = sorted(_roots, key=len, reverse=True)
        _roots_re = re.compile("(" + "|".join(map(re.escape, ordered)) + r")/[^'\"\n]*") \
            if ordered else None


def private_roots() -> dict[str, str]:
    """The registered roots (as matched) and their labels; for tests and diagnostics."""
    with _roots_lock:
        return dict(_roots)


def _redact_paths(text: str) -> str:
    pattern = _roots_re
    if pattern is None:
        return text
    return pattern.sub(lambda m: f"{_roots.get(m.group(1), m.group(1))}/{PATH_REDACTED}", text)


def redact(text: str, max_len: int | None = MAX_MESSAGE) -> str:
    """What must never reach a log, cut out of a line (see the module docstring).

    `max_len`: where a line is cut (None: never); a traceback is cut by `redact_traceback`."""
    text = _redact_paths(text)
    text = _PATIENT_KEYS.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)
    text = _DICOM_PATIENT_TAG.sub("(0010,xxxx) [redacted]", text)
    text = _VR_VALUE.sub(lambda m: f"{m.group(1)}[redacted]", text)
    text = _NAMED_VALUE.sub(lambda m: f"{m.group(1)}[redacted]", text)
    text = _UID.sub(_uid, text)
    text = _BYTES_REPR.sub("[bytes redacted]", text)
    text = _ENCODED_RUN.sub("[payload redacted]", text)
    if max_len is not None and len(text) > max_len:
        text = text[:max_len] + f"... [{len(text) - max_len} characters cut]"
    return text


def redact_traceback(text: str) -> str:
    """A traceback or stack redacted; when too long its start goes, so the exception stays."""
    text = redact(text, None)
    if len(text) > MAX_TRACEBACK:
        text = f"[{len(text) - MAX_TRACEBACK} characters cut] ..." + text[-MAX_TRACEBACK:]
    return text


def _uid(m: re.Match[str]) -> str:
    value = m.group(0).rstrip(".")
    parts = value.split(".")
    short = len(parts) <= 4 and all(p.isdigit() and len(p) <= 3 for p in parts)
    if short or value.startswith(_STANDARD_UID):  # a version, an IPv4 address; the standard's
        return m.group(0)
    return "[uid redacted]" + m.group(0)[len(value):]


_REDACTED = "_fedsilo_redacted"
_FORMAT_TRACEBACK = logging.Formatter()


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a record in place: message, traceback and stack (once; later calls return it).

    The traceback is formatted here and kept, redacted, in `exc_text`; `exc_info` stays (code
    that asks whether a record carries an exception still sees it) and no formatter formats
    it again, since `logging.Formatter.format` only does so while `exc_text` is empty."""
    if getattr(record, _REDACTED, False):
        return record
    try:
        message = record.getMessage()
    except Exception as exc:  # noqa: BLE001 - a bad format string must not raise in the caller
        message = f"{record.msg!s} [log arguments did not format: {type(exc).__name__}]"
    record.msg = redact(message)
    record.args = None
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact_traceback(_FORMAT_TRACEBACK.formatException(record.exc_info))
    elif record.exc_text:  # formatted elsewhere already (a handler that ran before us)
        record.exc_text = redact_traceback(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_traceback(record.stack_info)
    setattr(record, _REDACTED, True)
    return record


class RedactingFilter(logging.Filter):
    """Redacts records that did not come through the record factory (see the module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, _REDACTED, False) and record.exc_info:
            record.exc_text = None  # a handler before us may have cached the raw traceback
        redact_record(record)
        return True


class _RedactingFactory:
    """Wraps the log-record factory that was in place: every record is redacted as it is made."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(self.inner(*args, **kwargs))


def _install_factory() -> None:
    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(current))


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("agent").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("agent").critical("uncaught exception in thread %s", name,
                                        exc_info=(args.exc_type, args.exc_value,
                                                  args.exc_traceback))


def _route_uncaught() -> None:
    """Tracebacks of uncaught exceptions go through the redacting handler, not raw to stderr."""
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


class JournaldFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def setup_logging(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """One handler on the root logger (journald-style under systemd), redaction everywhere."""
    _install_factory()
    _route_uncaught()
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

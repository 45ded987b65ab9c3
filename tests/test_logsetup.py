"""Logging: journald priorities, and nothing patient-like or payload-like gets written."""

from __future__ import annotations

import base64
import errno
import io
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.ingest import watch as watch_mod
from agent.ops.logsetup import (
    MAX_MESSAGE,
    add_private_root,
    private_roots,
    redact,
    setup_logging,
)


@pytest.mark.parametrize("line,kept,gone", [
    ("rejected file: PatientName=Doe^John, reason=bad", "reason=bad", "Doe^John"),
    ("PatientID: '12345678' in series 2", "in series 2", "12345678"),
    ("element (0010,0030) Patient's Birth Date 19500101", "element", "19500101"),
    ("body " + base64.b64encode(bytes(range(200))).decode(), "body", "AAECAwQF"),
    ("chunk b'" + "\\x00" * 50 + "' refused", "refused", "\\x00\\x00"),
])
def test_redaction_keeps_the_reason_and_drops_the_value(line, kept, gone):
    out = redact(line)
    assert kept in out and gone not in out


def test_sizes_topics_and_digests_survive_and_long_lines_are_cut():
    line = ("dropped message on fedsilo/v1/fed/site/north/update/3/chunk/0 (1048600 bytes): "
            "chunk_digest_mismatch " + "a" * 64)
    assert redact(line) == line  # a sha256 digest is not a payload
    assert len(redact("x" * 10_000)) < MAX_MESSAGE + 100


def test_setup_logging_filters_and_prefixes_priorities_under_journald(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setitem(os.environ, "JOURNAL_STREAM", "8:1234")
    setup_logging("DEBUG", stream=stream)
    log = logging.getLogger("agent.test")
    log.warning("quarantined %s: PatientName=%s", "file.dcm", "Doe^Jane")
    log.info("round %d closed", 3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>WARNING agent.test: quarantined file.dcm")
    assert "Doe^Jane" not in lines[0] and "[redacted]" in lines[0]
    assert lines[1] == "<6>INFO agent.test: round 3 closed"
    monkeypatch.delitem(os.environ, "JOURNAL_STREAM")
    setup_logging("INFO")


NON_CONFORMANT = "1.2.826.0.1.3680043.8.498.0123456789"  # a leading zero: not a valid UID
INVALID = "1.2.826.0.1.3680043.8.498.77x"


def _bad_uid_series(directory):
    from tests.test_dicom_helpers import write_series

    def edit(ds, k):
        if k == 0:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = NON_CONFORMANT
        else:
            ds.FrameOfReferenceUID = INVALID
    return write_series(directory, 2, edit=edit)


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu) not found")
def test_listener_run_logs_no_raw_uid_from_pydicom_or_pynetdicom(tmp_path):
    # Issue 17.8: "Invalid value for VR UI: '<uid>'" (pydicom) and "Non-conformant 'Affected
    # SOP Instance UID' value '<uid>'" (pynetdicom) reached the site log verbatim.
    from agent.config import DicomSources
    from agent.ingest.service import IngestService

    files = _bad_uid_series(tmp_path / "pacs")
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    service = IngestService(tmp_path / "state", DicomSources(
        listen=True, ae_title="FEDSILO", port=0, bind="127.0.0.1", allowed_callers=("PACS",)))
    service.start()
    try:
        sent = subprocess.run(["storescu", "-aet", "PACS", "-aec", "FEDSILO", "127.0.0.1",
                               str(service.listener_port), *map(str, files)],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, TCP_NODELAY="1"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        end = time.monotonic() + 30
        while service.status_extra()["ingest_stored"] < 2 and time.monotonic() < end:
            time.sleep(0.1)
        assert service.status_extra()["ingest_stored"] == 2
    finally:
        service.stop()
        setup_logging("INFO")
    out = stream.getvalue()
    assert NON_CONFORMANT not in out and INVALID not in out and "3680043" not in out, out
    assert "pynetdicom.utils: Non-conformant 'Affected SOP Instance UID' value [redacted]" in out
    # pydicom's own "Invalid value for VR UI: ..." lines show redacted too, until the first
    # ingested file silences pydicom's logger for the process (earlier tests may have).
    assert all("Invalid value for VR UI: [redacted]." in line for line in out.splitlines()
               if line.split()[2:3] == ["pydicom:"])


def test_ingest_run_logs_no_raw_uid(tmp_path):
    files = _bad_uid_series(tmp_path / "in")
    run = subprocess.run([sys.executable, "-m", "agent", "--log-level", "DEBUG", "ingest",
                          str(files[0].parent), "--state", str(tmp_path / "s"), "--backend",
                          "reference"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stored 2 files" in run.stdout
    assert "3680043" not in run.stderr + run.stdout, run.stderr


def test_redaction_of_uids_keeps_standard_uids_versions_and_addresses():
    line = ("C-STORE 1.2.840.10008.5.1.4.1.1.2 in 1.2.840.10008.1.2.4.50 from 10.1.2.3 and "
            "0.0.0.0:11112, fedsilo 0.1.0; instance 2.25.329800735698586629295641978511506172918"
            " and 1.3.6.1.4.1.9590.100.1.2.1234.")
    out = redact(line)
    assert out.startswith("C-STORE 1.2.840.10008.5.1.4.1.1.2 in 1.2.840.10008.1.2.4.50 from "
                          "10.1.2.3 and 0.0.0.0:11112, fedsilo 0.1.0; instance [uid redacted]")
    assert "9590" not in out and "32980073" not in out


# ------------------------------------------------------------------ tracebacks, private roots
# Issue 13.5: tracebacks and stacks went out unredacted, and watch-folder paths (patient names)
# were logged as they were.

PATIENT = "DOE^JOHN"


@pytest.fixture
def both_outputs(caplog):
    """(stream of the handler setup_logging installs, caplog) both on the root logger, caplog's
    handler first: it formats a record before ours does, so redaction cannot rely on our
    handler having run."""
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    root = logging.getLogger()
    root.handlers.insert(0, caplog.handler)
    try:
        yield stream, caplog
    finally:
        setup_logging("INFO")


def _no_patient(text: str) -> None:
    for part in ("DOE", "JOHN", "CANARY"):
        assert part not in text, text


def test_a_logged_traceback_is_redacted_for_every_handler(tmp_path, both_outputs):
    stream, caplog = both_outputs
    inbox = tmp_path / "inbox"
    (inbox / PATIENT / "CT").mkdir(parents=True)
    add_private_root(inbox)
    missing = inbox / PATIENT / "CT" / "1.dcm"
    log = logging.getLogger("agent.test")
    try:
        try:
            os.rename(missing, inbox / PATIENT / "2.dcm")  # a real OSError quoting both paths
        except OSError as exc:
            raise ValueError(f"PatientName={PATIENT} while reading {missing}") from exc
    except ValueError:
        log.exception("reading failed")
    for text in (stream.getvalue(), caplog.text):
        _no_patient(text)
        assert "reading failed\nTraceback (most recent call last):" in text
        assert f"FileNotFoundError: [Errno 2] No such file or directory: '{inbox}/" \
               f"[path redacted]' -> '{inbox}/[path redacted]'" in text
        assert f"ValueError: PatientName=[redacted] while reading {inbox}/[path redacted]" in text
    [record] = [r for r in caplog.records if r.getMessage() == "reading failed"]
    assert record.exc_info is not None and "[path redacted]" in record.exc_text


def test_stack_info_is_redacted(tmp_path, both_outputs):
    stream, caplog = both_outputs
    inbox = tmp_path / "drop"
    add_private_root(inbox, "drop folder")
    # Code whose file lies below a private root (a hook script in a patient's folder) shows
    # that path in the stack.
    code = compile("log.warning('where am I? PatientID=%s', pid, stack_info=True)\n",
                   str(inbox / PATIENT / "hook.py"), "exec")
    names = {"log": logging.getLogger("agent.test"), "pid": "CANARYID8842"}
    exec(code, names)  # (the stack shows this line, not the one above)
    for text in (stream.getvalue(), caplog.text):
        _no_patient(text)
        assert "where am I? PatientID=[redacted]\nStack (most recent call last):" in text
        assert 'File "drop folder/[path redacted]' in text


def test_an_uncaught_exception_in_a_thread_is_logged_redacted(tmp_path, both_outputs):
    stream, caplog = both_outputs
    inbox = tmp_path / "share"
    add_private_root(inbox)

    def fail() -> None:
        raise PermissionError(13, "Permission denied", str(inbox / PATIENT))

    thread = threading.Thread(target=fail, name="worker")
    thread.start()
    thread.join()
    for text in (stream.getvalue(), caplog.text):
        _no_patient(text)
        assert "uncaught exception in thread worker" in text
        assert f"PermissionError: [Errno 13] Permission denied: '{inbox}/[path redacted]'" in text


def test_private_roots_redact_what_is_below_them(tmp_path):
    inbox = tmp_path / "pacs"
    inbox.mkdir()
    link = tmp_path / "pacs-link"
    link.symlink_to(inbox)
    add_private_root(link)
    add_private_root(inbox / "nested", "nested")
    r = str(inbox)
    assert redact(f"watch folder {link}: polling") == f"watch folder {link}: polling"
    assert redact(f"in {link}/{PATIENT}/CT/1.dcm") == f"in {link}/[path redacted]"
    assert redact(f"in {r}/{PATIENT}/1.dcm") == f"in {link}/[path redacted]"  # resolved form
    assert redact(f"'{r}/{PATIENT} 2/x.dcm' and '{r}2/other'") == \
        f"'{link}/[path redacted]' and '{r}2/other'"  # a sibling with a longer name is not it
    assert redact(f"{r}/nested/{PATIENT}\nnext line") == "nested/[path redacted]\nnext line"
    assert redact(redact(f"{r}/{PATIENT}")) == f"{link}/[path redacted]"  # idempotent
    file_root = tmp_path / "one" / f"{PATIENT}.dcm"
    file_root.parent.mkdir()
    file_root.write_bytes(b"x")
    add_private_root(file_root)  # a file: its folder
    assert redact(str(file_root)) == f"{file_root.parent}/[path redacted]"
    add_private_root("/")  # refused: it would redact every absolute path
    assert "/" not in private_roots()
    assert redact("/etc/fedsilo/site.toml") == "/etc/fedsilo/site.toml"


def _blocked_move(kind: str, incoming: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "incoming_is_a_file":  # a real failure: incoming/ cannot be made
        incoming.write_bytes(b"")
        return

    def denied(src: Path, dest: Path) -> None:  # as os.replace says it, both paths quoted
        raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dest))

    monkeypatch.setattr(watch_mod, "move_file", denied)


@pytest.mark.parametrize("kind", ["incoming_is_a_file", "permission_denied"])
def test_watch_folder_warning_names_no_part_of_the_patient_folder(tmp_path, both_outputs,
                                                                  monkeypatch, kind):
    stream, caplog = both_outputs
    watch, incoming = tmp_path / "watch", tmp_path / "incoming"
    patient = watch / f"CANARYFOLDER_{PATIENT}" / "CT"
    patient.mkdir(parents=True)
    (patient / f"CANARYFILE_{PATIENT}_001.dcm").write_bytes(b"DICM")
    _blocked_move(kind, incoming, monkeypatch)
    clock = [1000.0]
    wf = watch_mod.WatchFolder(watch, incoming, lambda p, s: None, poll_s=1.0, settle_s=1.0,
                               clock=lambda: clock[0])
    assert wf.poll_once() == 0
    clock[0] += 2.0
    assert wf.poll_once() == 0
    for text in (stream.getvalue(), caplog.text):
        _no_patient(text)
        assert f"watch folder: cannot move a file into {incoming} (" in text
    assert (patient / f"CANARYFILE_{PATIENT}_001.dcm").exists()  # kept for the next try

"""A slow copy into the watch folder: a writer that pauses longer than the settle time must
end up ingested, not quarantined; a quarantined file completed later can be read again by
`fedsilo ingest --requeue-quarantine`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from agent.config import DicomSources
from agent.ingest import service as service_mod
from agent.ingest import watch as watch_mod
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.service import IngestService
from tests.test_dicom_helpers import SPEC, write_series

PAUSE_S = 3.5  # the watch folder settles after 2 s

WRITER = """
import sys, time
data = open(sys.argv[1], "rb").read()
with open(sys.argv[2], "wb") as f:
    f.write(data[:len(data) // 2])
    f.flush()
    time.sleep(float(sys.argv[3]))
    f.write(data[len(data) // 2:])
"""


def _slow_copy(tmp_path: Path) -> dict:
    """One slice copied into the watch folder by a writer that pauses half way."""
    [src] = write_series(tmp_path / "src", 1)
    drop = tmp_path / "drop"
    drop.mkdir()
    service = IngestService(tmp_path / "state", DicomSources(watch_dir=drop, series_quiet_s=0.2))
    service.set_imaging(SPEC)
    service.start()
    try:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(drop / "x.dcm"),
                                   str(PAUSE_S)])
        assert writer.wait(timeout=30) == 0
        end = time.monotonic() + 60
        while time.monotonic() < end:
            status = service.status_extra()
            if status["ingest_stored"] + status["ingest_quarantined"] >= 1:
                break
            time.sleep(0.1)
        return service.status_extra()
    finally:
        service.stop()


def test_a_writer_that_pauses_is_not_quarantined(tmp_path, monkeypatch):
    # Issue 17.7: the watch folder moved the half-written file after 2 s quiet; it was
    # quarantined as truncated while the writer kept writing into the moved inode.
    status = _slow_copy(tmp_path)
    assert status["ingest_stored"] == 1 and status["ingest_quarantined"] == 0, status


def test_a_writer_the_watch_cannot_see_is_read_again_once_quiet(tmp_path, monkeypatch, caplog):
    # A writer on another host (NFS/SMB) is not in our /proc: the file is moved half
    # written, reads as truncated, and is kept and read again once it stops changing.
    monkeypatch.setattr(watch_mod, "held_for_writing", lambda paths: set())
    monkeypatch.setattr(service_mod, "TRUNCATED_RETRY_S", 2.0, raising=False)
    caplog.set_level(logging.INFO, logger="agent.ingest.service")
    status = _slow_copy(tmp_path)
    assert status["ingest_stored"] == 1 and status["ingest_quarantined"] == 0, status
    assert "reads as truncated; it is read again once it has not changed" in caplog.text
    assert status["ingest_held_truncated"] == 0


def test_requeue_quarantine_ingests_a_file_completed_later(tmp_path):
    [src] = write_series(tmp_path / "src", 1)
    data = src.read_bytes()
    half = tmp_path / "half.dcm"
    half.write_bytes(data[:len(data) // 2])
    state = tmp_path / "state"
    p = IngestPipeline(state, SPEC, kernel_backend="reference")
    try:
        assert p.ingest_file(half, consume=True).reason == "truncated"
    finally:
        p.close()
    [held] = (state / "quarantine" / "truncated").glob("*.dcm")
    with held.open("ab") as f:  # the writer finished into the moved file
        f.write(data[len(data) // 2:])

    run = subprocess.run([sys.executable, "-m", "agent", "ingest", "--requeue-quarantine",
                          "--reason", "truncated", "--state", str(state), "--json",
                          "--backend", "reference"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["stored"] == 1 and summary["quarantine_held"] == {}, summary
    assert summary["instances"] == 1
    assert "ingest: 1 quarantined files read again" in run.stderr
    assert not held.exists()


def test_requeue_quarantine_keeps_a_file_still_broken(tmp_path):
    state = tmp_path / "state"
    p = IngestPipeline(state, SPEC, kernel_backend="reference")
    try:
        (tmp_path / "junk.dcm").write_bytes(b"not dicom at all" * 10)
        assert p.ingest_file(tmp_path / "junk.dcm", consume=True).reason == "not_dicom"
        assert p.requeue_quarantine(["truncated"]) == 0  # another reason: untouched
        assert p.requeue_quarantine(()) == 1
        summary = p.summary()
    finally:
        p.close()
    assert summary["quarantine_held"] == {"not_dicom": 1} and summary["stored"] == 0


def test_requeue_with_a_bad_reason_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "agent", "ingest", "--requeue-quarantine",
                          "--reason", "../etc", "--state", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "--reason: '../etc' is not a reason code" in run.stderr

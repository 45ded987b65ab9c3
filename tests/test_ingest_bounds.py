"""The ingest side is bounded: a queue of `dicom.queue_files`, `incoming/` of
`dicom.incoming_max_bytes`, the quarantine of `dicom.quarantine_max_bytes`. Beyond them the
listener answers 0xA700 (the PACS keeps its copy and retries), the watch folder waits, and a
bad file stays where it was; nothing accepted is lost. Real storescu, real files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.config import DicomSources
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.service import IngestService
from tests.test_dicom_helpers import write_series

AET, CALLER = "FEDSILO", "PACS"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="needs dcmtk")


def _storescu(port: int, files: list[Path]) -> list[str]:
    """Send `files` in one association; the DIMSE status of each sent, as storescu reports
    it (storescu, like many PACS, halts the association at the first refusal)."""
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(["storescu", "-v", "-aet", CALLER, "-aec", AET, "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, timeout=60, env=env)
    out = r.stdout + r.stderr
    statuses = re.findall(r"Received Store Response \(([^)]*)\)", out)
    assert statuses, out
    return statuses


def _service(tmp_path: Path, **bounds) -> IngestService:
    cfg = DicomSources(listen=True, ae_title=AET, port=0, bind="127.0.0.1",
                       allowed_callers=(CALLER,), series_quiet_s=3600, **bounds)
    return IngestService(tmp_path / "state", cfg, workers=1)


def _wait(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _incoming(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "state" / "incoming").iterdir() if not p.name.startswith(".")]


@needs_dcmtk
def test_a_full_queue_answers_out_of_resources_and_a_retry_stores_the_rest(tmp_path):
    files = write_series(tmp_path / "series", 8)
    service = _service(tmp_path, queue_files=3)
    service.pause_consumer()  # a consumer busy with a big series
    service.start()
    try:
        statuses = _storescu(service.listener_port, files)
        assert statuses == ["Success"] * 3 + ["Refused: OutOfResources"]  # then it halts
        status = service.status_extra()
        assert status["ingest_queue"] == 3 and status["ingest_refused_queue_full"] == 1
        assert len(_incoming(tmp_path)) == 3  # refused ones are not kept
        service.resume_consumer()
        _wait(lambda: service.status_extra()["ingest_stored"] == 3)
        # The PACS retries the whole series: the other five are stored now, none twice.
        assert _storescu(service.listener_port, files) == ["Success"] * 8
        _wait(lambda: service.status_extra()["ingest_duplicates"] == 3)
        _wait(lambda: service.status_extra()["ingest_stored"] == 8)
        assert service.pipeline.summary()["instances"] == 8
        _wait(lambda: not _incoming(tmp_path))
        assert service.incoming_bytes == 0
    finally:
        service.stop()


@needs_dcmtk
def test_a_full_incoming_folder_answers_out_of_resources(tmp_path):
    files = write_series(tmp_path / "series", 6)
    size = files[0].stat().st_size
    service = _service(tmp_path, incoming_max_bytes=int(2.5 * size))
    service.pause_consumer()
    service.start()
    try:
        statuses = _storescu(service.listener_port, files)
        assert statuses == ["Success"] * 2 + ["Refused: OutOfResources"]
        status = service.status_extra()
        assert status["ingest_refused_incoming_full"] == 1
        assert status["ingest_incoming_bytes"] <= 2.5 * size
        service.resume_consumer()
        _wait(lambda: service.incoming_bytes == 0)
        assert _storescu(service.listener_port, files[2:4]) == ["Success"] * 2
        _wait(lambda: service.status_extra()["ingest_stored"] == 4)
    finally:
        service.stop()


def test_the_watch_folder_waits_for_room_and_leaves_files_in_place(tmp_path):
    watch = tmp_path / "watch"
    files = write_series(watch, 6)
    cfg = DicomSources(watch_dir=watch, series_quiet_s=3600, queue_files=2)
    service = IngestService(tmp_path / "state", cfg, workers=1)
    service.pause_consumer()
    service.start()
    try:
        _wait(lambda: service.status_extra()["ingest_watch_waiting"])
        time.sleep(1.0)
        # Two queued, one moved and waiting for room; the rest untouched in the watch folder.
        assert len(_incoming(tmp_path)) == 3
        assert sum(p.exists() for p in files) == 3
        assert service.status_extra()["ingest_refused_queue_full"] == 0  # nobody refused
        service.resume_consumer()
        _wait(lambda: service.status_extra()["ingest_stored"] == 6)
        assert not any(p.exists() for p in files) and not _incoming(tmp_path)
        assert not service.status_extra()["ingest_watch_waiting"]
    finally:
        service.stop()


def test_a_full_quarantine_keeps_bad_files_where_they_were(tmp_path):
    bad = []
    for i in range(4):
        p = tmp_path / "in" / f"junk{i}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i + 1]) * 4000)  # not DICOM
        bad.append(p)
    pipeline = IngestPipeline(tmp_path / "state", None, kernel_backend="reference",
                              quarantine_max_bytes=9000)
    try:
        for p in bad:
            assert pipeline.ingest_file(p, consume=True).status == "quarantined"
        summary = pipeline.summary()
        assert summary["quarantine_held"] == {"not_dicom": 2}  # 8000 bytes fit, 12000 do not
        assert summary["quarantine_full"] == 2
        assert [p.exists() for p in bad] == [False, False, True, True]  # kept, not lost
        for f in pipeline.quarantine.files():  # a person clears the quarantine
            f.unlink()
        pipeline.quarantine._scanned_at -= 60  # as if the next rescan were due
        assert pipeline.ingest_file(bad[2], consume=True).status == "quarantined"
        assert not bad[2].exists() and pipeline.summary()["quarantine_held"] == {"not_dicom": 1}
    finally:
        pipeline.close()

"""The C-STORE listener against real peers: dcmtk's echoscu/storescu and pynetdicom as SCU.

Each test starts its own listener on a free loopback port. The CT series is built from
pydicom's CT_small.dcm (new UIDs, slices along z); some slices are compressed by dcmtk's own
encoders (JPEG lossless SV1, RLE, JPEG-LS) and one by pydicom (JPEG 2000 lossless), so the
transfer syntaxes travel exactly as a PACS would send them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTPlanStorage

from agent.config import DicomSources
from agent.errors import FedsiloError
from agent.ingest.listener import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    TRANSFER_SYNTAXES,
    DicomListener,
)

DCMTK = ("echoscu", "storescu", "dcmcjpeg", "dcmcrle", "dcmcjpls")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in DCMTK),
                                reason="dcmtk tools (apt install dcmtk) not found")

AET = "FEDSILO"
CALLER = "PACS"
PATIENT_NAME = "CompressedSamples^CT1"  # in CT_small.dcm: must never reach a log line


class Calls:
    """Thread-safe record of on_file calls (they come from pynetdicom's threads)."""

    def __init__(self, fail: bool = False) -> None:
        self.items: list[tuple[Path, str]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, path: Path, source: str) -> None:
        if self.fail:
            raise RuntimeError("queue full")
        with self._lock:
            self.items.append((path, source))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six CT slices of one series; slices 1-4 compressed with four different codecs."""
    out = tmp_path_factory.mktemp("series")
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for i in range(6):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in src.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.SliceLocation = z + 5.0 * i
        plain = out / f"slice{i}.dcm"
        ds.save_as(plain, enforce_file_format=True)
        paths.append(plain)
    _dcmtk(["dcmcjpeg", paths[1], out / "jpeg.dcm"])   # JPEG lossless SV1 (.70)
    _dcmtk(["dcmcrle", paths[2], out / "rle.dcm"])     # RLE lossless
    _dcmtk(["dcmcjpls", paths[3], out / "jls.dcm"])    # JPEG-LS lossless (.80)
    j2k = pydicom.dcmread(paths[4])
    j2k.compress(JPEG2000Lossless)
    j2k.save_as(out / "j2k.dcm", enforce_file_format=True)
    paths[1:5] = [out / "jpeg.dcm", out / "rle.dcm", out / "jls.dcm", out / "j2k.dcm"]
    return paths


def _dcmtk(argv: list, **kw) -> subprocess.CompletedProcess:
    # Debian's dcmtk leaves Nagle on: ~40 ms per instance from delayed ACKs unless told.
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30,
                          check=kw.pop("check", True), env=env, **kw)


def _start(tmp_path: Path, callers: tuple[str, ...] = (CALLER,), fail: bool = False):
    incoming = tmp_path / "incoming"
    calls = Calls(fail=fail)
    cfg = DicomSources(listen=True, ae_title=AET, port=0, bind="127.0.0.1",
                       allowed_callers=callers)
    listener = DicomListener(cfg, incoming, calls)
    listener.start()
    return listener, incoming, calls


@pytest.fixture
def scp(tmp_path: Path):
    listener, incoming, calls = _start(tmp_path)
    try:
        yield listener, incoming, calls
    finally:
        listener.stop()


def wait_for_log(caplog: pytest.LogCaptureFixture, needle: str, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(needle in r.getMessage() for r in caplog.records):
            return True
        time.sleep(0.02)
    return False


def _all_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()) if d.exists() else []


def _scu_store(port: int, path: Path, calling: str = CALLER) -> int:
    """C-STORE one file with pynetdicom as SCU; returns the exact DIMSE status."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


# ------------------------------------------------------------------------------------ tests


def test_echoscu_succeeds(scp):
    listener, incoming, calls = scp
    assert listener.port and listener.port > 0
    r = _dcmtk(["echoscu", "-aet", CALLER, "-aec", AET, "127.0.0.1", listener.port])
    assert r.returncode == 0
    assert _all_files(incoming) == [] and calls.items == []


# A PACS-like proposal: CT with each lossless codec in its own context, plus uncompressed.
STORESCU_CFG = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[JPEGLossless]
TransferSyntax1 = JPEGLossless:Non-hierarchical-1stOrderPrediction
[RLE]
TransferSyntax1 = RLELossless
[JPEGLS]
TransferSyntax1 = JPEGLSLossless
[J2K]
TransferSyntax1 = JPEG2000LosslessOnly
[[PresentationContexts]]
[CT]
PresentationContext1 = CTImageStorage\\JPEGLossless
PresentationContext2 = CTImageStorage\\RLE
PresentationContext3 = CTImageStorage\\JPEGLS
PresentationContext4 = CTImageStorage\\J2K
PresentationContext5 = CTImageStorage\\Uncompressed
[[Profiles]]
[FedsiloCT]
PresentationContexts = CT
"""


def _assert_arrived_intact(incoming: Path, calls: Calls, sent_paths: list[Path]) -> set[str]:
    """Every sent instance is in incoming/ once, same transfer syntax, same elements and bytes."""
    files = _all_files(incoming)
    assert len(files) == len(sent_paths) and all(not p.name.startswith(".") for p in files)
    assert sorted(p for p, _ in calls.items) == files          # once per instance, these paths
    assert {s for _, s in calls.items} == {f"dicom:{CALLER}"}
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in sent_paths}
    reference_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    seen_ts = set()
    for path in files:
        got = pydicom.dcmread(path)
        assert got.SOPInstanceUID not in path.name                 # random name, not from data
        orig = pydicom.dcmread(sent.pop(got.SOPInstanceUID))
        ts = got.file_meta.TransferSyntaxUID
        seen_ts.add(str(ts))
        assert ts == orig.file_meta.TransferSyntaxUID
        assert got.file_meta.MediaStorageSOPInstanceUID == orig.SOPInstanceUID
        assert got.PixelData == orig.PixelData                      # byte-identical, compressed
        if 0xFFFCFFFC in orig:       # CT_small ends in Data Set Trailing Padding, which
            del orig[0xFFFCFFFC]     # the standard lets a sender drop (dcmtk does)
        assert got == orig                                          # every other element same
        assert np.array_equal(got.pixel_array, reference_pixels)    # lossless codecs decode
    assert sent == {}
    return seen_ts


def test_storescu_series_arrives_intact(scp, series, tmp_path):
    listener, incoming, calls = scp
    cfg = tmp_path / "storescu.cfg"
    cfg.write_text(STORESCU_CFG)
    r = _dcmtk(["storescu", "-xf", cfg, "FedsiloCT", "-aet", CALLER, "-aec", AET,
                "127.0.0.1", listener.port, *series], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    seen_ts = _assert_arrived_intact(incoming, calls, series)
    assert seen_ts == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5",
                       "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}


@pytest.mark.parametrize("flag,index,ts", [
    ("-xs", 1, "1.2.840.10008.1.2.4.70"),   # dcmcjpeg: JPEG lossless SV1
    ("-xr", 2, "1.2.840.10008.1.2.5"),      # dcmcrle
    ("-xt", 3, "1.2.840.10008.1.2.4.80"),   # dcmcjpls: JPEG-LS lossless
    ("-xv", 4, "1.2.840.10008.1.2.4.90"),   # JPEG 2000 lossless
])
def test_storescu_propose_flag_sends_compressed_as_is(scp, series, flag, index, ts):
    """The one-flag route a PACS admin would try first (`storescu -xs ...`)."""
    listener, incoming, calls = scp
    r = _dcmtk(["storescu", flag, "-R", "-aet", CALLER, "-aec", AET, "127.0.0.1",
                listener.port, series[index], series[0]], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ts in _assert_arrived_intact(incoming, calls, [series[index], series[0]])


def test_every_listed_transfer_syntax_is_accepted(scp):
    listener, _, _ = scp
    ae = AE(ae_title=CALLER)
    for ts in TRANSFER_SYNTAXES:  # one context per syntax, so each is negotiated on its own
        ae.add_requested_context(CTImageStorage, ts)
    ae.add_requested_context(RTPlanStorage)  # not stored, but negotiated (-> 0x0122 later)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    try:
        assert assoc.is_established
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                    for cx in assoc.accepted_contexts}
        assert {(CTImageStorage, ts) for ts in TRANSFER_SYNTAXES} <= accepted
        assert RTPlanStorage in {a for a, _ in accepted}
        assert assoc.rejected_contexts == []
    finally:
        assoc.release()


@pytest.mark.parametrize("offered,chosen", [
    ([JPEGLossless, ExplicitVRLittleEndian], ExplicitVRLittleEndian),   # uncompressed first
    ([JPEGBaseline8Bit, JPEGLosslessSV1], JPEGLosslessSV1),             # lossless over lossy
    ([JPEG2000, JPEGLSLossless], JPEGLSLossless),
    ([JPEGBaseline8Bit], JPEGBaseline8Bit),                             # lossy if that is all
])
def test_preference_within_one_context_never_picks_lossy_over_better(scp, offered, chosen):
    listener, _, _ = scp
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, offered)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    try:
        assert assoc.is_established
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [chosen]
    finally:
        assoc.release()


def test_unsupported_sop_class_refused_with_0122(scp):
    listener, incoming, calls = scp
    rtplan = Path(get_testdata_file("rtplan.dcm"))
    r = _dcmtk(["storescu", "-v", "-aet", CALLER, "-aec", AET, "127.0.0.1", listener.port,
                rtplan], check=False)
    out = r.stdout + r.stderr
    assert "Association Accepted" in out
    assert "Received Store Response (Refused: SOPClassNotSupported)" in out
    assert _scu_store(listener.port, rtplan) == STATUS_SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert _all_files(incoming) == [] and calls.items == []


def test_unknown_calling_ae_is_rejected(scp, series):
    listener, incoming, calls = scp
    r = _dcmtk(["storescu", "-aet", "INTRUDER", "-aec", AET, "127.0.0.1", listener.port,
                series[0]], check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Association Rejected" in out and "Rejected Permanent" in out
    assert "Calling AE Title Not Recognized" in out
    assert _all_files(incoming) == [] and calls.items == []


def test_wrong_called_ae_is_rejected(scp):
    listener, _, _ = scp
    r = _dcmtk(["echoscu", "-aet", CALLER, "-aec", "NOTFEDSILO", "127.0.0.1", listener.port],
               check=False)
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stdout + r.stderr


def test_empty_allow_list_refuses_everyone(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="agent.ingest.listener")
    listener, incoming, _ = _start(tmp_path, callers=())
    try:
        assert any("allowed_callers is empty" in m for m in caplog.messages)
        r = _dcmtk(["echoscu", "-aet", CALLER, "-aec", AET, "127.0.0.1", listener.port],
                   check=False)
        assert r.returncode != 0
        assert "Calling AE Title Not Recognized" in r.stdout + r.stderr
    finally:
        listener.stop()
    assert _all_files(incoming) == []


def test_write_failure_answers_out_of_resources(scp, series):
    listener, incoming, calls = scp
    shutil.rmtree(incoming)  # the disk went away under us
    assert _scu_store(listener.port, series[0]) == STATUS_OUT_OF_RESOURCES == 0xA700
    assert not incoming.exists() and calls.items == []


def test_queue_refusal_answers_out_of_resources_and_keeps_nothing(tmp_path, series):
    listener, incoming, _ = _start(tmp_path, fail=True)
    try:
        assert _scu_store(listener.port, series[0]) == STATUS_OUT_OF_RESOURCES
    finally:
        listener.stop()
    assert _all_files(incoming) == []  # the PACS will retry; no orphan, no duplicate


def test_logs_carry_no_element_values(scp, series, caplog):
    listener, incoming, calls = scp
    caplog.set_level(logging.DEBUG)
    assert _scu_store(listener.port, series[0]) == 0x0000
    assert len(calls.items) == 1
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    assert wait_for_log(caplog, "1 stored")               # the per-association summary
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "CTImageStorage" in text and CALLER in text
    assert PATIENT_NAME not in text and "CompressedSamples" not in text
    ds = pydicom.dcmread(series[0])
    assert str(ds.SOPInstanceUID) not in text


def test_port_in_use_is_a_clear_error(scp, tmp_path):
    listener, _, _ = scp
    cfg = DicomSources(ae_title=AET, port=listener.port, bind="127.0.0.1",
                       allowed_callers=(CALLER,))
    second = DicomListener(cfg, tmp_path / "other", Calls())
    with pytest.raises(FedsiloError, match=f"cannot listen on 127.0.0.1:{listener.port}"):
        second.start()
    second.stop()  # nothing started: a no-op


def test_stop_closes_the_port(tmp_path):
    listener, _, _ = _start(tmp_path)
    port = listener.port
    listener.stop()
    listener.stop()  # idempotent
    r = _dcmtk(["echoscu", "-to", "5", "-aet", CALLER, "-aec", AET, "127.0.0.1", port],
               check=False)
    assert r.returncode != 0


def test_storescu_series_is_assembled_and_stored_by_the_site_ingest(series, tmp_path):
    """The whole way in: storescu -> listener -> ingest queue -> pipeline -> stored series."""
    from agent.config import ImagingSpec
    from agent.ingest.service import IngestService

    imaging = ImagingSpec(depth=4, size=32)
    cfg = DicomSources(listen=True, ae_title=AET, port=0, bind="127.0.0.1",
                       allowed_callers=(CALLER,), series_quiet_s=0.5)
    service = IngestService(tmp_path / "state", cfg, workers=2)  # a profile's ingest_workers
    assert service.pipeline.decoder.workers == 2 and service.pipeline.tree_workers == 2
    service.set_imaging(imaging)
    service.start()
    try:
        storescu_cfg = tmp_path / "storescu.cfg"
        storescu_cfg.write_text(STORESCU_CFG)
        r = _dcmtk(["storescu", "-xf", storescu_cfg, "FedsiloCT", "-aet", CALLER, "-aec", AET,
                    "127.0.0.1", service.listener_port, *series], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and service.status_extra()["series_complete"] < 1:
            time.sleep(0.2)
        status = service.status_extra()
        assert status["series_complete"] == 1, status
        assert status["ingest_stored"] == len(series) and status["ingest_quarantined"] == 0
        stored = service.pipeline.store.series_for_patients(imaging)
        assert len(stored) == 1
        image = np.load(next(iter(stored.values())), allow_pickle=False)
        assert image.shape == (4, 32, 32) and image.dtype == np.float32
        assert np.all(np.isfinite(image)) and 0.0 <= image.min() <= image.max() <= 1.0
        assert not [p for p in (tmp_path / "state" / "incoming").iterdir()
                    if not p.name.startswith(".")]  # every received file was consumed
    finally:
        service.stop()

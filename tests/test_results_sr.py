"""Result SRs: the reference read at ingest, the private book that keeps it, the SR built from it,
and the C-STORE to a real PACS stand-in (dcmtk's storescp), checked with dcmtk's dsrdump.

The reference comes from pydicom's CT_small.dcm; tests that need PHI values to look for use
distinctive made-up ones (CT_small's StudyID equals its PatientID).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from agent.errors import DataError, FedsiloError
from agent.federation.broker import free_port, wait_listening
from agent.results.pacs import PacsError, PacsNode, send_sr
from agent.results.reference import (
    REFERENCE_TAGS,
    ReferenceBook,
    StudyReference,
    read_reference,
)
from agent.results.sr import RESEARCH_ONLY, SCHEME, ModelResult, build_sr, sr_bytes, write_sr

CT = Path(get_testdata_file("CT_small.dcm"))
NOW = datetime(2024, 5, 1, 12, 30, 5)
RESULT = ModelResult(probability=0.8125, target="poor_outcome_90d", model_kind="logistic",
                     model_version="sha256:3f2a9c", federation="stroke-eu", round=7,
                     created_utc="2024-05-01T10:30:05Z")
NEEDS_DCMTK = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("storescp", "dsrdump")),
    reason="dcmtk tools storescp/dsrdump (apt install dcmtk) not found")
PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-778899", "PatientBirthDate": "19450203",
       "AccessionNumber": "ACC-5512", "ReferringPhysicianName": "Referrer^Rita",
       "StudyID": "STUDY-42"}


def _copy(tmp_path: Path, name: str, **changes: object) -> Path:
    """CT_small with attributes changed (value None deletes the attribute)."""
    ds = pydicom.dcmread(CT)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPInstanceUID" in changes and changes["SOPInstanceUID"]:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _phi_ref() -> StudyReference:
    return dataclasses.replace(
        read_reference(CT), patient_name=PHI["PatientName"], patient_id=PHI["PatientID"],
        patient_birth_date=PHI["PatientBirthDate"], accession_number=PHI["AccessionNumber"],
        referring_physician=PHI["ReferringPhysicianName"], study_id=PHI["StudyID"])


# ---------------------------------------------------------------------------- read_reference


def test_read_reference_of_a_real_ct_file():
    ref = read_reference(CT)
    src = pydicom.dcmread(CT)
    assert ref.patient_id == src.PatientID
    assert ref.patient_name == str(src.PatientName) == "CompressedSamples^CT1"
    assert ref.patient_sex == src.PatientSex
    assert ref.study_uid == src.StudyInstanceUID and ref.series_uid == src.SeriesInstanceUID
    assert ref.study_date == src.StudyDate and ref.modality == "CT"
    assert ref.patient_birth_date == "" and ref.accession_number == ""  # type 2, empty here
    assert ref.instances == ((src.SOPClassUID, src.SOPInstanceUID),)
    assert "CompressedSamples" not in repr(ref) and "CompressedSamples" not in str(ref)
    assert {"StudyInstanceUID", "SOPInstanceUID", "PatientName"} <= set(REFERENCE_TAGS)
    assert "PixelData" not in REFERENCE_TAGS


@pytest.mark.parametrize("keyword, value", [("SeriesInstanceUID", None), ("SOPInstanceUID", ""),
                                            ("StudyInstanceUID", None)])
def test_read_reference_refuses_a_file_without_a_uid(tmp_path, keyword, value):
    path = _copy(tmp_path, "broken.dcm", **{keyword: value})
    with pytest.raises(DataError) as info:
        read_reference(path)
    message = str(info.value)
    assert str(path) in message and keyword in message
    assert "CompressedSamples" not in message and "1CT1" not in message


def test_read_reference_refuses_a_file_that_is_not_dicom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not DICOM at all\n")
    with pytest.raises(DataError, match="notes.txt"):
        read_reference(path)


# ---------------------------------------------------------------------------- ReferenceBook


def test_reference_book_merges_instances_survives_reopen_and_drops(tmp_path):
    sop_a, sop_b = generate_uid(), generate_uid()
    ref_a = read_reference(_copy(tmp_path, "a.dcm", SOPInstanceUID=sop_a))
    ref_b = read_reference(_copy(tmp_path, "b.dcm", SOPInstanceUID=sop_b,
                                 AccessionNumber="ACC-1"))
    state = tmp_path / "state"
    book = ReferenceBook(state)
    book.add("series-p1", ref_a)
    book.add("series-p1", ref_b)
    book.add("series-p1", ref_a)  # the same instance again (a resend): no duplicate
    book.add("series-p2", dataclasses.replace(ref_a, series_uid="1.2.3.4", instances=(
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"),)))
    book.close()

    book = ReferenceBook(state)
    try:
        got = book.get("series-p1")
        assert got is not None
        assert got.instances == (ref_a.instances[0], ref_b.instances[0])
        assert got.study_uid == ref_a.study_uid and got.patient_name == ref_a.patient_name
        assert got.accession_number == "ACC-1"  # a blank filled from the later instance
        assert book.pending() == ["series-p1", "series-p2"]
        assert book.get("unknown") is None

        mismatch = dataclasses.replace(ref_b, study_uid="1.2.999")
        with pytest.raises(DataError, match="study_uid differs"):
            book.add("series-p1", mismatch)
        assert book.get("series-p1") == got  # the refused add changed nothing

        db_file = state / "results" / "references.sqlite"
        assert b"CompressedSamples" in db_file.read_bytes()  # so the check below means something
        book.drop("series-p1")
        book.drop("series-p1")  # idempotent
        assert book.get("series-p1") is None
        assert book.pending() == ["series-p2"]
        book.drop("series-p2")
        assert book.pending() == []
    finally:
        book.close()
    # secure_delete: the dropped PHI is gone from the file, not just unlinked from the index
    assert b"CompressedSamples" not in db_file.read_bytes()


def test_reference_book_is_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    old = os.umask(0o022)
    try:
        book = ReferenceBook(state)
        book.add("series-p1", read_reference(CT))
        book.close()
    finally:
        os.umask(old)
    folder = state / "results"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for f in folder.iterdir():  # the database, and any journal sqlite left behind
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    assert (folder / "references.sqlite").exists()


def test_reference_book_is_thread_safe(tmp_path):
    book = ReferenceBook(tmp_path)
    base = read_reference(CT)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                book.add("series-p1", dataclasses.replace(
                    base, instances=((base.instances[0][0], f"1.2.3.{n}.{i}"),)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert len(book.get("series-p1").instances) == 80
    finally:
        book.close()


# ---------------------------------------------------------------------------- build_sr


def _content(ds: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in ds.ContentSequence}


def test_build_sr_content_and_references():
    ref = read_reference(CT)
    ds = build_sr(ref, RESULT, now=NOW)
    assert ds.SOPClassUID == ComprehensiveSRStorage == "1.2.840.10008.5.1.4.1.1.88.33"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "SR" and ds.SeriesNumber == 9901 and "fedsilo" in ds.SeriesDescription
    assert ds.SOPInstanceUID not in {sop for _, sop in ref.instances}
    assert ds.SeriesInstanceUID != ref.series_uid
    assert ds.StudyInstanceUID == ref.study_uid and ds.PatientID == ref.patient_id
    assert str(ds.PatientName) == ref.patient_name and ds.AccessionNumber == ""
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (ds.ContentDate, ds.ContentTime) == ("20240501", "123005")

    study = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert study.StudyInstanceUID == ref.study_uid
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ref.series_uid
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in series.ReferencedSOPSequence] == list(ref.instances)

    assert ds.ValueType == "CONTAINER"
    assert ds.ConceptNameCodeSequence[0].CodingSchemeDesignator == SCHEME
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == SCHEME
    items = _content(ds)
    num = items["Probability"]
    assert num.ValueType == "NUM" and num.ConceptNameCodeSequence[0].CodeValue == "122157"
    measured = num.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(RESULT.probability, abs=1e-12)
    assert measured.FloatingPointValue == pytest.approx(RESULT.probability, abs=1e-15)
    assert measured.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert items["Predicted outcome"].TextValue == "poor_outcome_90d"
    assert items["Algorithm Name"].TextValue == "logistic"
    assert items["Algorithm Version"].TextValue == "sha256:3f2a9c"
    assert items["Federation"].TextValue == "stroke-eu"
    assert items["Federation round"].TextValue == "7"
    assert items["Series Instance UID"].UID == ref.series_uid
    assert items["Comment"].TextValue == RESEARCH_ONLY
    assert all(i.RelationshipType == "CONTAINS" for i in ds.ContentSequence)


def test_build_sr_uids_are_new_unless_given():
    ref = read_reference(CT)
    a, b = build_sr(ref, RESULT, now=NOW), build_sr(ref, RESULT, now=NOW)
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    fixed = generate_uid()
    again = build_sr(ref, RESULT, now=NOW, sop_instance_uid=fixed)
    assert again.SOPInstanceUID == again.file_meta.MediaStorageSOPInstanceUID == fixed


def test_build_sr_timezone_offset_from_an_aware_now():
    ds = build_sr(read_reference(CT), RESULT,
                  now=datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))))
    assert ds.TimezoneOffsetFromUTC == "+0200"
    assert "TimezoneOffsetFromUTC" not in build_sr(read_reference(CT), RESULT, now=NOW)


def test_build_sr_carries_phi_only_in_the_copied_identifiers():
    ds = build_sr(_phi_ref(), RESULT, now=NOW)
    for elem in ds.iterall():
        if elem.VR == "SQ" or elem.value is None:
            continue
        for keyword, value in PHI.items():
            if elem.keyword != keyword:
                assert value not in str(elem.value), (elem.keyword, keyword)
    for keyword, value in PHI.items():
        assert str(ds[keyword].value) == value
    raw = sr_bytes(ds)
    for value in PHI.values():
        assert raw.count(value.encode()) == 1, value
    # no other attribute than the SR's own and the reference's
    assert not {e.keyword for e in ds} & {"OtherPatientIDs", "PatientAddress", "InstitutionName",
                                          "OperatorsName", "PerformingPhysicianName"}


def test_write_sr_is_a_private_part10_file(tmp_path):
    ds = build_sr(read_reference(CT), RESULT, now=NOW)
    path = tmp_path / "result.dcm"
    write_sr(ds, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert path.read_bytes() == sr_bytes(ds)


@pytest.mark.parametrize("p", [-0.01, 1.5, float("nan")])
def test_model_result_refuses_a_probability_outside_0_1(p):
    with pytest.raises(ValueError, match="probability"):
        dataclasses.replace(RESULT, probability=p)


# ---------------------------------------------------------------------------- send_sr


def _storescp(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-od", str(out), "-aet", "PACS", *extra, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_listening(port, proc, "storescp", 10)
    return proc, port, out


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


@NEEDS_DCMTK
def test_send_sr_to_storescp_and_dsrdump_reads_it(tmp_path):
    ref = read_reference(CT)
    ds = build_sr(ref, RESULT, now=NOW)
    proc, port, out = _storescp(tmp_path)
    try:
        send_sr(ds, PacsNode("PACS", "127.0.0.1", port, timeout_s=10))
    finally:
        _stop(proc)
    received = sorted(out.iterdir())
    assert len(received) == 1 and received[0].name.startswith("SR")
    back = pydicom.dcmread(received[0])
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.StudyInstanceUID == ref.study_uid
    dump = subprocess.run(["dsrdump", "+Pl", "+Pc", str(received[0])], capture_output=True,
                          text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert not [line for line in dump.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert "Comprehensive SR Document" in dump.stdout
    assert '(122157,DCM,"Probability")="0.8125"' in dump.stdout
    assert "Research use only" in dump.stdout and RESEARCH_ONLY in dump.stdout
    assert "poor_outcome_90d" in dump.stdout and "COMPLETE" in dump.stdout


def test_send_sr_to_a_closed_port_fails_quickly_naming_the_node():
    port = free_port()  # bound and released: nobody listens there
    start = time.monotonic()
    with pytest.raises(PacsError) as info:
        send_sr(build_sr(read_reference(CT), RESULT, now=NOW),
                PacsNode("PACS", "127.0.0.1", port, timeout_s=2))
    assert time.monotonic() - start < 5
    assert f"PACS@127.0.0.1:{port}" in str(info.value)
    assert "could not connect" in str(info.value)
    assert isinstance(info.value, FedsiloError)


@NEEDS_DCMTK
def test_send_sr_association_refused_by_the_pacs(tmp_path):
    """storescp --refuse: "rejected", also when the PACS closes the socket right after its
    A-ASSOCIATE-RJ and pynetdicom sees the close first (it then reports an abort)."""
    proc, port, _ = _storescp(tmp_path, "--refuse")
    try:
        with pytest.raises(PacsError, match=f"PACS@127.0.0.1:{port}: association rejected"):
            send_sr(build_sr(read_reference(CT), RESULT, now=NOW),
                    PacsNode("PACS", "127.0.0.1", port, timeout_s=5))
    finally:
        _stop(proc)


@NEEDS_DCMTK
def test_send_sr_association_aborted_before_the_response(tmp_path):
    proc, port, out = _storescp(tmp_path, "--abort-after")
    try:
        with pytest.raises(PacsError, match=f"PACS@127.0.0.1:{port}: no C-STORE response"):
            send_sr(build_sr(read_reference(CT), RESULT, now=NOW),
                    PacsNode("PACS", "127.0.0.1", port, timeout_s=5))
    finally:
        _stop(proc)


def test_send_sr_failure_status_is_reported_in_hex():
    """A real pynetdicom SCP that answers every C-STORE with 0xA700 (out of resources)."""
    scp = AE(ae_title="PACS")
    scp.add_supported_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    try:
        port = server.server_address[1]
        with pytest.raises(PacsError, match=r"status 0xA700") as info:
            send_sr(build_sr(read_reference(CT), RESULT, now=NOW),
                    PacsNode("PACS", "127.0.0.1", port, timeout_s=5))
        assert f"PACS@127.0.0.1:{port}" in str(info.value)
    finally:
        server.shutdown()

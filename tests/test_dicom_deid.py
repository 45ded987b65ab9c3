"""De-identification: the site secret, pseudonyms that join clinical rows, and no PHI anywhere
(store, logs, warnings, summary) — including PHI inside nested sequences."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

from agent.config import FeatureSpec
from agent.ingest import deid
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.tables import load_table
from tests.test_dicom_helpers import SPEC, tree_bytes, write_series

# Distinctive values that must never leave the DICOM files.
PHI = {
    "name": "Zyxwquux^Hermione",
    "patient_id": "PID-ZQ-77231",
    "birth_date": "19231107",
    "address": "77 Qwopfstrasse Vhyllby",
    "nested_name": "Nestedqwopf^Olaf",
    "nested_id": "NEST-ZQ-55119",
    "request_id": "REQ-ZQ-3318",
    "step_id": "SPS-ZQ-9924",
    "private": "PRIVZQ-Bloodtype-0-neg",
    "bad_uid": "1.2.826.0.ZQUIDPHI.7",
}


def _phi_edit(ds: Dataset, k: int) -> None:
    ds.PatientName = PHI["name"]
    ds.PatientBirthDate = PHI["birth_date"]
    ds.PatientAddress = PHI["address"]
    ref = Dataset()
    ref.PatientName = PHI["nested_name"]
    ref.PatientID = PHI["nested_id"]
    ds.ReferencedPatientSequence = Sequence([ref])
    req = Dataset()
    req.RequestedProcedureID = PHI["request_id"]
    step = Dataset()
    step.ScheduledProcedureStepID = PHI["step_id"]
    step.PatientName = PHI["nested_name"]  # PHI two levels down
    req.ReferencedStudySequence = Sequence([step])
    ds.RequestAttributesSequence = Sequence([req])
    block = ds.private_block(0x0011, "ZQ HOSPITAL", create=True)
    block.add_new(0x01, "LO", PHI["private"])


def test_secret_is_private_stable_and_shared_by_concurrent_starts(tmp_path):
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(deid.load_or_create_secret(tmp_path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / deid.SECRET_FILE
    assert len(set(keys)) == 1 and len(keys[0]) == deid.SECRET_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert deid.load_or_create_secret(tmp_path) == keys[0]  # reused after a "restart"
    assert [p.name for p in tmp_path.iterdir()] == [deid.SECRET_FILE]  # no temp files left
    other = deid.load_or_create_secret(tmp_path / "elsewhere")
    assert other != keys[0]


def test_truncated_secret_is_refused_not_replaced(tmp_path):
    (tmp_path / deid.SECRET_FILE).write_bytes(b"short")
    with pytest.raises(deid.DataError, match="restore it from backup"):
        deid.load_or_create_secret(tmp_path)
    assert (tmp_path / deid.SECRET_FILE).read_bytes() == b"short"


def test_pseudonym_is_keyed_hmac_and_ignores_padding():
    a, b = b"a" * 32, b"b" * 32
    assert deid.pseudonym(a, "12345") == deid.pseudonym(a, "12345 ")
    assert deid.pseudonym(a, "12345") != deid.pseudonym(b, "12345")
    assert deid.pseudonym(a, "12345") != deid.pseudonym(a, "12346")
    assert len(deid.pseudonym(a, "x")) == 32 and int(deid.pseudonym(a, "x"), 16) >= 0
    # Matches the textbook HMAC-SHA256 construction.
    import hashlib
    import hmac
    assert deid.pseudonym(a, "12345") == hmac.new(a, b"12345", hashlib.sha256).hexdigest()[:32]


def test_whitelist_accessor_refuses_other_keywords():
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    assert deid.kept(ds, "Rows") == 128
    with pytest.raises(ValueError, match="whitelist"):
        deid.kept(ds, "PatientName")


def test_image_pseudonym_joins_the_clinical_row(tmp_path):
    state = tmp_path / "state"
    p = IngestPipeline(state, SPEC, kernel_backend="reference")
    try:
        for pid in ("SITE-0001", "SITE-0002"):
            for path in write_series(tmp_path / pid, 3, patient_id=pid):
                assert p.ingest_file(path).status == "stored"
        assert len(p.complete_series(quiet_s=0.0)) == 2
        images = p.store.series_for_patients()
    finally:
        p.close()
    table_path = tmp_path / "clinical.csv"
    table_path.write_text("pid,age,outcome\nSITE-0001,71,1\nSITE-0002,64,0\nSITE-0003,80,1\n")
    table = load_table(table_path, (FeatureSpec("age", "numeric"),), "outcome", "mean",
                       id_column="pid")
    secret = deid.load_or_create_secret(state)  # the same key the pipeline created
    hashed = [deid.pseudonym(secret, i) for i in table.ids]
    assert set(images) == set(hashed[:2]) and hashed[2] not in images


def test_no_phi_in_store_logs_warnings_or_summary(tmp_path, caplog, capfd):
    def phi_rle(ds: Dataset, k: int) -> None:
        _phi_edit(ds, k)
        ds.compress(RLELossless, ds.pixel_array)  # decoded in the worker process

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing the bad UID warns too; not under test
        paths = write_series(tmp_path / "in", 4, patient_id=PHI["patient_id"], edit=_phi_edit)
        bad_uid = write_series(tmp_path / "in2", 3, patient_id=PHI["patient_id"],
                               study_uid=PHI["bad_uid"], edit=phi_rle)
    # The test is only meaningful if pydicom would leak: show that it does without our guard.
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        str(pydicom.dcmread(bad_uid[0]).StudyInstanceUID)
    assert any(PHI["bad_uid"] in str(w.message) for w in raw)

    caplog.set_level(logging.DEBUG)
    state = tmp_path / "state"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p = IngestPipeline(state, SPEC, kernel_backend="reference")
        try:
            outcomes = [p.ingest_file(x) for x in paths + bad_uid]
            done = p.complete_series(quiet_s=0.0)
            summary = p.summary()
        finally:
            p.close()
    assert [o.status for o in outcomes] == ["stored"] * 7 and len(done) == 2

    leaks = [str(w.message) for w in seen] + [caplog.text, json.dumps(summary),
                                              repr(outcomes)]
    out, err = capfd.readouterr()
    leaks += [out, err]
    store = tree_bytes(state / "images")
    assert {".sqlite", ".npy"} <= {f.suffix for f, _ in store}
    for value in PHI.values():
        for text in leaks:
            assert value not in text
        for encoded in {value.encode(), value.encode("utf-16-le")}:
            for path, data in store:
                assert encoded not in data, f"{value} found in {path.name}"
    # Nothing but the secret, the store and an (empty) quarantine was written.
    assert sorted(x.name for x in state.iterdir()) == ["images", "quarantine", "secret.key"]
    assert os.listdir(state / "quarantine") == []

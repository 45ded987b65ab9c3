"""Scoring at the site, end to end with real peers: dcmtk's storescu sends a study to a running
`fedsilo site run`, the agent ingests and completes the series, scores it with the exported
model in its state directory and the patient's clinical row, keeps the result, and sends a
DICOM SR to dcmtk's storescp as the PACS; dsrdump reads the SR."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from tomli_w import dumps

from agent.demo import ct
from agent.federation.broker import LocalMosquitto, free_port, wait_listening
from agent.federation.envelope import BodyKind, make_manifest
from agent.learn import onnx_export as ox
from agent.learn.distribution import save_received_model
from agent.results.reference import ReferenceBook
from agent.results.scoring import SCORED, SR_SENT, ScoreBook
from tests.fedharness import start_site
from tests.test_predict_study import ROW, fedsilo, inline, project_probability, saved_model

pytestmark = pytest.mark.integration
NEEDS_DCMTK = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("storescu", "storescp", "dsrdump")),
    reason="dcmtk (storescu, storescp, dsrdump) not found")
PATIENT = "SYN-00042"


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _clinical_table(path: Path) -> Path:
    """The site's table: our patient and another, an outcome column the scorer ignores."""
    other = {**ROW, "age": "55", "sex": "male"}
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient_id", *ROW, "mrs_poor_90d"])
        w.writeheader()
        w.writerow({"patient_id": "SYN-00001", **other, "mrs_poor_90d": "0"})
        w.writerow({"patient_id": PATIENT, **ROW, "mrs_poor_90d": "1"})
    return path


@NEEDS_DCMTK
def test_storescu_to_agent_to_score_to_sr_to_storescp(tmp_path):
    saved = saved_model("cnn_fused")
    state = tmp_path / "north"
    onnx_bytes = ox.to_onnx(saved).SerializeToString()
    header = make_manifest(federation="stroke-imaging", round=6, sender="coordinator",
                           body_kind=BodyKind.MODEL, body=onnx_bytes, created=time.time(),
                           meta={"run": "r-1"}).header()
    save_received_model(state / "model", header, onnx_bytes)  # as distribution leaves it

    scanner = ct.scanner_for_site(0)
    study = tmp_path / "study"
    files = ct.write_series(study, PATIENT, ct.head_phantom_hu(
        scanner, 25.0, np.random.default_rng(4)), scanner)

    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs_port, listen_port = free_port(), free_port()
    pacs = subprocess.Popen(["storescp", "-od", str(pacs_dir), "-aet", "PACS", str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    procs = []
    try:
        wait_listening(pacs_port, pacs, "storescp")
        with LocalMosquitto() as broker:
            cfg = tmp_path / "north.toml"
            cfg.write_text(dumps({
                "site": {"id": "north", "federation": "stroke-imaging",
                         "state_dir": str(state)},
                "broker": {"host": "127.0.0.1", "port": broker.port},
                "data": {"table": str(_clinical_table(tmp_path / "clinical.csv")),
                         "id_column": "patient_id"},
                "dicom": {"listen": True, "port": listen_port, "bind": "127.0.0.1",
                          "ae_title": "FEDSILO", "allowed_callers": ["MODALITY"],
                          "series_quiet_s": 1.0},
                "results": {"score": True, "pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                    "port": pacs_port, "timeout_s": 10.0}},
            }))
            log = tmp_path / "north.log"
            procs.append(start_site(cfg, log))
            wait_listening(listen_port, procs[0], "the site's DICOM listener")
            sent = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "FEDSILO",
                                   "127.0.0.1", str(listen_port), *map(str, files)],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            received = _wait_for(lambda: sorted(pacs_dir.iterdir()), 90, "the SR at storescp")
            # let the agent record the send before it stops
            _wait_for(lambda: "result SR sent" in log.read_text(), 20, "the send logged")
            procs[0].terminate()  # a daemon: it runs until told to stop (SIGTERM)
            assert procs[0].wait(timeout=30) == 0
    finally:
        pacs.kill()
        pacs.wait(10)

    # what the PACS got: one SR, filed with the original study, readable by dsrdump
    (sr_file,) = received
    ds = pydicom.dcmread(sr_file)
    original = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.PatientID == original.PatientID == PATIENT
    assert ds.SeriesInstanceUID != original.SeriesInstanceUID
    dump = subprocess.run(["dsrdump", "+Pl", "+Pc", str(sr_file)], capture_output=True,
                          text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert "Research use only" in dump.stdout

    # the score is the exported model's on the site's own preprocessing of that study
    r = fedsilo("predict", "--model", state / "model", "--clinical", inline(ROW), "--study",
                study, "--json")
    assert r.returncode == 0, r.stderr
    cli_p = json.loads(r.stdout)["probability"]
    book = ScoreBook(state)
    try:
        (score,) = book.all()
    finally:
        book.close()
    assert score.status == SCORED and score.sr_status == SR_SENT
    assert score.sr_uid == ds.SOPInstanceUID
    assert abs(score.probability - cli_p) <= 1e-6
    num = next(item for item in ds.ContentSequence if item.ValueType == "NUM")
    assert abs(float(num.MeasuredValueSequence[0].NumericValue) - score.probability) <= 1e-6
    grid_image = _site_grid(state)
    assert abs(score.probability - project_probability(saved, ROW, grid_image)) <= 1e-5
    # the identifiers kept for the SR are gone once it was sent
    with ReferenceBook(state) as refs:
        assert refs.pending() == []
    text = log.read_text()
    assert PATIENT not in text and original.StudyInstanceUID not in text


def _site_grid(state: Path) -> np.ndarray:
    (array,) = (state / "images" / "series").glob("*.npy")
    return np.load(array, allow_pickle=False)

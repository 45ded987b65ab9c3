"""The site's scorer in process, over a real ingest pipeline, real DICOM files and a real
exported model: which series it scores (the watermark), a clinical row that comes later, a row
the model cannot read, a tampered model, and a PACS that is down and comes back (storescp)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config.site import DataSources, ResultsConfig
from agent.demo import ct
from agent.demo.imaging import DEMO_IMAGING
from agent.federation.broker import free_port
from agent.federation.envelope import BodyKind, make_manifest
from agent.ingest.pipeline import IngestPipeline
from agent.learn import onnx_export as ox
from agent.learn.distribution import save_received_model
from agent.results.pacs import PacsNode
from agent.results.scoring import (
    NO_ROW,
    SCORED,
    SR_FAILED,
    SR_PENDING,
    SR_SENT,
    SiteScorer,
)
from tests.test_predict_study import ROW, project_probability, saved_model

HAVE_STORESCP = shutil.which("storescp") is not None
T0 = time.time() + 3600.0  # the tests' clock: after every file's arrival


def _table(path: Path, rows: dict[str, dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient_id", *ROW])
        w.writeheader()
        for pid, row in rows.items():
            w.writerow({"patient_id": pid, **row})


class Site:
    """A pipeline, a clinical table and a scorer over one state directory."""

    def __init__(self, tmp: Path, pacs_port: int | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.pipeline = IngestPipeline(self.state, DEMO_IMAGING, kernel_backend="reference")
        self.table = tmp / "clinical.csv"
        _table(self.table, {})
        pacs = None if pacs_port is None else PacsNode("PACS", "127.0.0.1", pacs_port,
                                                         timeout_s=5.0)
        self.scorer = SiteScorer(self.state, ResultsConfig(score=True, pacs=pacs, retry_s=60),
                                 DataSources(table=self.table, id_column="patient_id"),
                                 store=self.pipeline.store, secret=self.pipeline.secret,
                                 verifier=None, set_imaging=self.pipeline.set_imaging)
        self.pipeline.on_stored = self.scorer.capture
        self.saved = saved_model("cnn_fused")

    def place_model(self) -> bytes:
        body = ox.to_onnx(self.saved).SerializeToString()
        header = make_manifest(federation="stroke-imaging", round=6, sender="coordinator",
                               body_kind=BodyKind.MODEL, body=body, created=time.time(),
                               meta={"run": "r-1"}).header()
        save_received_model(self.state / "model", header, body)
        return body

    def arrive(self, pid: str, completed: float, seed: int, *also: str) -> None:
        """Studies received (file by file, as the listener hands them over) of `pid` and the
        patients in `also`, completed in one pass at T0 + `completed` seconds."""
        scanner = ct.scanner_for_site(0)
        for k, patient in enumerate((pid, *also)):
            folder = self.tmp / f"study-{patient}"
            hu = ct.head_phantom_hu(scanner, 10.0 + seed, np.random.default_rng(seed + k))
            for path in ct.write_series(folder, patient, hu, scanner):
                assert self.pipeline.ingest_file(path, source="listener").status == "stored"
        done = self.pipeline.complete_series(quiet_s=0.0, now=T0 + completed)
        assert len(done) == 1 + len(also)

    def close(self) -> None:
        self.scorer.close()
        self.pipeline.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def test_only_series_after_the_model_are_scored_and_late_rows_are_picked_up(site):
    site.arrive("SYN-OLD", completed=1000.0, seed=1)  # a training-era study
    site.place_model()
    site.scorer.poll(now=T0 + 2000.0)
    assert site.scorer.model is not None and site.scorer.book.all() == []
    site.arrive("SYN-NEW", completed=3000.0, seed=2)
    site.scorer.poll(now=T0 + 3001.0)
    (s,) = site.scorer.book.all()
    assert s.status == NO_ROW and s.probability is None and s.sr_status is None
    time.sleep(0.01)
    _table(site.table, {"SYN-NEW": ROW})  # the admission row arrives later
    site.scorer.poll(now=T0 + 3002.0)
    (s,) = site.scorer.book.all()
    assert s.status == SCORED and s.model_sha256 == site.scorer.model.sha256
    image = np.load(site.pipeline.store.series_array(s.series), allow_pickle=False)
    assert abs(s.probability - project_probability(site.saved, ROW, image)) <= 1e-5
    site.scorer.poll(now=T0 + 3003.0)  # nothing new: nothing scored twice
    assert len(site.scorer.book.all()) == 1
    extra = site.scorer.status_extra()
    assert extra == {"scored_series": 1, "scoring_model": site.scorer.model.version}
    _check_status_keys(extra)


def test_series_completed_in_one_pass_are_paged_through_each_once(site, monkeypatch):
    """A completion pass stamps a whole batch with one time: paging must not stop at (or loop
    on) a page full of equal timestamps."""
    monkeypatch.setattr("agent.results.scoring.PAGE", 2)
    site.place_model()
    site.scorer.poll(now=T0 + 2000.0)
    pids = [f"SYN-B{k}" for k in range(5)]
    _table(site.table, {pid: ROW for pid in pids})
    site.arrive(pids[0], 3000.0, 7, *pids[1:])
    site.scorer.poll(now=T0 + 3001.0)
    scores = site.scorer.book.all()
    assert len(scores) == 5 and {s.status for s in scores} == {SCORED}
    assert len({s.series for s in scores}) == 5


def test_a_row_the_table_reader_skips_is_recorded_not_guessed(site):
    site.place_model()
    site.scorer.poll(now=T0 + 2000.0)
    _table(site.table, {"SYN-X": {**ROW, "sex": "unknown-x"}})
    site.arrive("SYN-X", completed=3000.0, seed=3)
    site.scorer.poll(now=T0 + 3001.0)
    (s,) = site.scorer.book.all()
    # the table reader skips the row (unknown level), as training would: no row, no guess
    assert s.status == NO_ROW and s.probability is None


def test_a_tampered_model_is_not_used(site, caplog):
    body = site.place_model()
    onnx_file = site.state / "model" / "model.onnx"
    tampered = bytearray(body)
    tampered[len(tampered) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(tampered))
    _table(site.table, {"SYN-T": ROW})
    site.arrive("SYN-T", completed=3000.0, seed=4)
    with caplog.at_level("ERROR"):
        site.scorer.poll(now=T0 + 2000.0)
    assert site.scorer.model is None and site.scorer.book.all() == []
    assert "model not used for scoring" in caplog.text


@pytest.mark.skipif(not HAVE_STORESCP, reason="dcmtk's storescp not found")
def test_pacs_down_then_back(tmp_path):
    site = Site(tmp_path, pacs_port=free_port())  # nothing listens there yet
    try:
        site.place_model()
        site.scorer.poll(now=T0 + 2000.0)
        _table(site.table, {"SYN-P": ROW, "SYN-Q": ROW})
        site.arrive("SYN-P", 3000.0, 5, "SYN-Q")
        site.scorer.poll(now=T0 + 3001.0)
        s, q = site.scorer.book.all()
        assert s.status == SCORED and s.sr_status == SR_FAILED and "could not connect" in s.detail
        # after one failure the PACS is not tried again in the same poll (each try may wait
        # out its timeout on the ingest thread): the second result stays pending
        assert q.status == SCORED and q.sr_status == SR_PENDING and q.sr_uid is None
        assert sorted(site.scorer.references.pending()) == sorted([s.series, q.series])
        first_uid = s.sr_uid
        out = tmp_path / "pacs"
        out.mkdir()
        port = free_port()
        pacs = subprocess.Popen(["storescp", "-od", str(out), "-aet", "PACS", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            time.sleep(0.5)
            site.scorer.pacs = PacsNode("PACS", "127.0.0.1", port, timeout_s=5.0)
            site.scorer.poll(now=time.time() + 1.0)  # the pending one goes; the failed waits
            assert [x.sr_status for x in site.scorer.book.all()] == [SR_FAILED, SR_SENT]
            site.scorer.poll(now=time.time() + 61.0)  # after retry_s: resent
        finally:
            pacs.kill()
            pacs.wait(10)
        s, q = site.scorer.book.all()
        assert s.sr_status == q.sr_status == SR_SENT
        assert s.sr_uid == first_uid  # the same instance, resent
        assert sorted(f.name for f in out.iterdir()) == sorted(f"SRc.{u}" for u in
                                                                (s.sr_uid, q.sr_uid))
        assert site.scorer.references.pending() == []
        extra = site.scorer.status_extra()
        assert (extra["results_sent"], extra["results_failed"]) == (2, 0)
        _check_status_keys(extra)
    finally:
        site.close()


def _check_status_keys(extra: dict) -> None:
    """The scorer's status keys are the ones docs/status.schema.json describes."""
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent.parent / "docs" / "status.schema.json").read_text())
    for key, value in extra.items():
        jsonschema.validate(value, schema["properties"][key])

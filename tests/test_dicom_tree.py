"""The fast paths of ingest: reader processes for trees, batch commits, in-plane pending
slices, and the direct native decode. Each must give exactly what the plain path gives."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from agent.config import ImagingSpec
from agent.ingest import pipeline as pipeline_mod
from agent.ingest.decode_worker import as_frames, decode_native
from agent.ingest.dicom_read import classify, parse_header, read_dataset
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.tree_pool import TreePool
from tests.test_dicom_helpers import CT_SMALL, SPEC, ct_template, write_series


def _tree(root: Path) -> None:
    write_series(root / "a", 5)
    write_series(root / "b", 4, patient_id="PAT-2", dz=2.0)
    shutil.copy(root / "a" / "slice001.dcm", root / "a" / "again.dcm")  # a duplicate
    (root / "junk.txt").write_text("not dicom")
    ds = pydicom.dcmread(CT_SMALL)
    ds.compress(RLELossless, ds.pixel_array)
    ds.save_as(root / "rle.dcm", enforce_file_format=True)


def _run(state: Path, root: Path, workers: int, imaging: ImagingSpec | None = SPEC
         ) -> tuple[dict, dict[str, np.ndarray]]:
    p = IngestPipeline(state, imaging, kernel_backend="reference", tree_workers=workers)
    try:
        p.ingest_tree(root)
        if imaging is None:
            p.set_imaging(SPEC)
        p.complete_series(quiet_s=0.0, now=time.time() + 1)
        summary = p.summary()
        arrays = {k: np.load(v) for k, v in p.store.series_for_patients().items()}
    finally:
        p.close()
    return summary, arrays


def test_reader_processes_match_the_in_process_walk(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "POOL_MIN_FILES", 1)
    taken = []
    offer = TreePool.offer

    def offer_once_started(self, path):  # readers start in the background; wait for them
        self._starter.join()
        taken.append(offer(self, path))
        return taken[-1]

    monkeypatch.setattr(TreePool, "offer", offer_once_started)
    _tree(tmp_path / "in")
    plain = _run(tmp_path / "s1", tmp_path / "in", workers=1)
    pooled = _run(tmp_path / "s2", tmp_path / "in", workers=2)
    late = _run(tmp_path / "s3", tmp_path / "in", workers=2, imaging=None)  # raw pending
    assert sum(taken) >= 4  # the reader did ingest files (a full queue at least)
    assert plain[0] == pooled[0] == late[0]
    assert plain[0]["stored"] == 10 and plain[0]["duplicates"] == 1
    assert plain[0]["quarantined"] == {"not_dicom": 1}
    # Pseudonyms use each state's own key: compare the arrays, in patient order.
    a, b, c = ([v for _, v in sorted(r[1].items(), key=lambda kv: kv[1].sum())]
               for r in (plain, pooled, late))
    assert len(a) == 2
    for x, y, z in zip(a, b, c, strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)


def test_tree_batch_is_committed_when_ingest_tree_returns(tmp_path):
    write_series(tmp_path / "in", 3)
    p = IngestPipeline(tmp_path / "s", SPEC, kernel_backend="reference", tree_workers=1)
    try:
        assert p.ingest_tree(tmp_path / "in")["stored"] == 3
    finally:
        p.close()
    p = IngestPipeline(tmp_path / "s", SPEC, kernel_backend="reference")
    try:
        assert p.store.counts()["pending_slices"] == 3
        assert p.ingest_tree(tmp_path / "in")["duplicates"] == 3
    finally:
        p.close()


def test_pending_slices_for_another_grid_make_the_series_invalid(tmp_path):
    paths = write_series(tmp_path / "in", 3)
    p = IngestPipeline(tmp_path / "s", SPEC, kernel_backend="reference")
    try:
        assert all(p.ingest_file(f).status == "stored" for f in paths)
        p.set_imaging(ImagingSpec(modality="CT", depth=4, size=8))
        assert p.complete_series(quiet_s=0.0, now=time.time() + 1) == []
        assert p.summary()["series_invalid"] == {"grid_changed": 1}
    finally:
        p.close()


@pytest.mark.parametrize("bits,stored,signed,syntax", [
    (16, 16, 1, ExplicitVRLittleEndian), (16, 12, 0, ExplicitVRLittleEndian),
    (16, 12, 1, ImplicitVRLittleEndian), (8, 8, 0, ExplicitVRLittleEndian),
    (8, 7, 1, ExplicitVRLittleEndian), (32, 32, 1, ExplicitVRLittleEndian),
    (32, 20, 0, ImplicitVRLittleEndian)])
def test_direct_native_decode_equals_pixel_array(tmp_path, bits, stored, signed, syntax):
    ds = copy.deepcopy(ct_template())
    rng = np.random.default_rng(bits + stored)
    raw = rng.integers(0, 256, ds.Rows * ds.Columns * bits // 8, dtype=np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = signed
    ds.PixelData = raw
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    ds = read_dataset(tmp_path / "x.dcm")
    header = parse_header(ds, classify(ds))
    fast = decode_native(ds, header)
    slow = ds.pixel_array
    assert fast.dtype == slow.dtype and np.array_equal(fast.reshape(slow.shape), slow)
    assert np.array_equal(as_frames(fast, header), as_frames(slow, header))


def test_a_reader_killed_mid_walk_loses_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "POOL_MIN_FILES", 1)
    offer = TreePool.offer
    sent = []

    def offer_then_kill(self, path):
        self._starter.join()
        ok = offer(self, path)
        sent.append(ok)
        if sum(sent) == 3:  # the reader holds answered, uncommitted files now
            self._readers[0].process.kill()
        return ok

    monkeypatch.setattr(TreePool, "offer", offer_then_kill)
    _tree(tmp_path / "in")
    plain = _run(tmp_path / "s1", tmp_path / "in", workers=1)[0]
    killed = _run(tmp_path / "s2", tmp_path / "in", workers=2)[0]
    assert sum(sent) >= 3


    def files(summary: dict) -> Counter:
        return Counter({"stored": summary["stored"], "duplicates": summary["duplicates"],
                        **summary["quarantined"], **summary["skipped"]})

    # Every file is accounted for once; at most the one the reader was on when killed
    # changed category (to decode_crashed), and the store holds what the outcomes say.
    lost = files(plain) - files(killed)
    assert files(killed) - files(plain) <= Counter(decode_crashed=1)
    assert lost.total() == killed["quarantined"].get("decode_crashed", 0)
    assert killed["instances"] == killed["stored"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the CLI starts no reader")
def test_cli_over_a_pool_sized_tree_prints_no_reader_traceback(tmp_path):
    # Issue 16.2: a reader still starting when the agent had read every file itself found
    # the pipe closed and printed a BrokenPipeError traceback on the (piped) stderr.
    write_series(tmp_path / "in", pipeline_mod.POOL_MIN_FILES)
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "ingest", str(tmp_path / "in"), "--state",
         str(tmp_path / "s"), "--json", "--backend", "reference"],
        capture_output=True, text=True, timeout=120)  # stderr a pipe, as in the issue
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["stored"] == pipeline_mod.POOL_MIN_FILES and summary["series_complete"] == 1
    assert not summary["quarantined"] and not summary["skipped"]

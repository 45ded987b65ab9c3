"""Ingest end to end: pydicom's whole test corpus (in process and through the CLI), transfer
syntaxes, multi-frame, broken and hostile files. Nothing may crash; every CT/MR image that
pydicom itself can decode is stored; everything else gets a reason."""

from __future__ import annotations

import copy
import ctypes
import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    RLELossless,
)

import kernels
from agent.ingest import dicom_read
from agent.ingest.decode_worker import DecodePool, decode_file
from agent.ingest.pipeline import IngestPipeline
from agent.ingest.preprocess import SliceInput, preprocess_series
from agent.ingest.quarantine import REASON_PATTERN
from tests.test_dicom_helpers import CT_SMALL, MR_SMALL, SPEC, ct_template, write_series

DATA_DIR = CT_SMALL.parent
STATUSES = {"stored", "duplicate", "quarantined", "skipped"}
CT_MR = set(dicom_read.IMAGE_SOP_CLASSES)


def _crash_or_stall(path: str) -> np.ndarray:
    """Decoder for the worker tests: a real segfault, a hang, or the normal decoder."""
    name = Path(path).name
    if name.startswith("crash"):
        ctypes.string_at(0)  # reads address 0: SIGSEGV in the worker
    if name.startswith("stall"):
        time.sleep(60)
    return decode_file(path)


@pytest.fixture(scope="module")
def pool():
    p = DecodePool(1, timeout_s=30.0)
    yield p
    p.close()


def _pipeline(tmp_path: Path, pool: DecodePool, name: str = "state") -> IngestPipeline:
    return IngestPipeline(tmp_path / name, SPEC, kernel_backend="reference", decoder=pool)


def _oracle(path: Path) -> tuple[str | None, bool]:
    """(SOPInstanceUID if pydicom reads a CT/MR image from it, whether pydicom decodes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            if ds.get("SOPClassUID") not in CT_MR:
                return None, False
            ds.pixel_array  # noqa: B018 - decoding is the point
            return str(ds.SOPInstanceUID), True
        except Exception:  # noqa: BLE001
            return None, False


# ---------------------------------------------------------------------------- the corpus


def test_every_pydicom_test_file_in_process(tmp_path, pool):
    files = sorted(Path(f) for f in pydicom.data.get_testdata_files())
    assert len(files) > 150
    p = _pipeline(tmp_path, pool)
    try:
        outcomes = {f: p.ingest_file(f) for f in files}
        p.complete_series(quiet_s=0.0)
        summary = p.summary()
        instances = p.store.counts()["instances"]
    finally:
        p.close()
    seen: set[str] = set()
    decodable = 0
    for f, o in outcomes.items():
        assert o.status in STATUSES, f.name
        if o.status in ("quarantined", "skipped"):
            assert o.reason and REASON_PATTERN.fullmatch(o.reason), (f.name, o.reason)
        else:
            assert o.reason is None
        sop, decodes = _oracle(f) if f.is_file() else (None, False)
        if decodes:  # a CT/MR image pydicom decodes: ours, first time stored, then duplicate
            decodable += 1
            assert o.status == ("duplicate" if sop in seen else "stored"), f.name
            seen.add(sop)
        else:
            assert o.status != "stored", f.name
    assert decodable >= 30 and instances == len(seen) == summary["stored"]
    assert outcomes[DATA_DIR / "rtplan.dcm"].reason == "not_ct_mr:RTPlanStorage"
    assert outcomes[DATA_DIR / "image_dfl.dcm"].reason == "not_ct_mr:SecondaryCaptureImageStorage"
    assert outcomes[DATA_DIR / "README.txt"].reason == "not_dicom"
    assert outcomes[DATA_DIR / "693_J2KI.dcm"].status == "stored"  # JPEG 2000, in the worker
    assert sum(summary["quarantined"].values()) + sum(summary["skipped"].values()) \
        + summary["stored"] + summary["duplicates"] == len(files)
    assert summary["series_complete"] >= 1 and "missing_slice" in summary["series_invalid"]


def test_cli_json_over_the_corpus_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "ingest", str(DATA_DIR), "--state", str(tmp_path / "s"),
         "--json", "--backend", "reference"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    files = [f for f in DATA_DIR.rglob("*") if f.is_file() and not f.name.startswith(".")]
    decodable = {sop for sop, ok in map(_oracle, files) if ok}
    assert summary["stored"] == len(decodable)
    assert summary["stored"] + summary["duplicates"] + sum(summary["quarantined"].values()) \
        + sum(summary["skipped"].values()) == len(files)
    assert summary["skipped"]["dicomdir"] >= 7 and summary["quarantined"]["not_dicom"] >= 5
    assert "ingest:" in proc.stderr  # the progress line


# ---------------------------------------------------------------------------- syntaxes, frames


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_expb.dcm", "MR_small_implicit.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_padded.dcm"])
def test_lossless_variants_store_the_same_pixels(tmp_path, pool, name):
    reference = pydicom.dcmread(MR_SMALL).pixel_array
    p = _pipeline(tmp_path, pool)
    try:
        assert p.ingest_file(Path(pydicom.data.get_testdata_file(name))).status == "stored"
        [series] = p.store.due_series(time.time() + 1, 0.0)
        [stored] = list(p.store.load_slices(p.store.pending_slices(series)))
    finally:
        p.close()
    assert stored.shape == (64, 64)
    assert np.array_equal(stored.astype(np.int64), reference.astype(np.int64))


def test_deflated_ct_is_stored(tmp_path, pool):
    ds = ct_template()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "dfl.dcm", enforce_file_format=True)
    p = _pipeline(tmp_path, pool)
    try:
        assert p.ingest_file(tmp_path / "dfl.dcm").status == "stored"
    finally:
        p.close()


def _enhanced_ct(frame_z: list[float]) -> Dataset:
    base = ct_template()
    ds = copy.deepcopy(base)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    frames = np.stack([base.pixel_array + np.int16(100 * i) for i in range(len(frame_z))])
    ds.NumberOfFrames = len(frame_z)
    ds.PixelData = frames.astype(np.int16).tobytes()
    shared = Dataset()
    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = base.ImageOrientationPatient
    measures.PixelSpacing = base.PixelSpacing
    rescale.RescaleSlope, rescale.RescaleIntercept = 1, -1024
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for z in frame_z:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = Sequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "RescaleSlope", "RescaleIntercept"):
        delattr(ds, kw)
    return ds


def test_enhanced_multiframe_slices_follow_their_functional_groups(tmp_path, pool):
    z = [10.0, 0.0, 5.0, 15.0]  # frames stored out of order on purpose
    ds = _enhanced_ct(z)
    ds.save_as(tmp_path / "enh.dcm", enforce_file_format=True)
    p = _pipeline(tmp_path, pool)
    try:
        assert p.ingest_file(tmp_path / "enh.dcm").status == "stored"
        [series] = p.complete_series(quiet_s=0.0)
        got = np.load(p.store.series_dir / f"{series}.npy", allow_pickle=False)
    finally:
        p.close()
    frames = ds.pixel_array
    order = np.argsort(z)
    expected = preprocess_series(
        [SliceInput(np.ascontiguousarray(frames[i]), 1.0, -1024.0, z[i]) for i in order], SPEC,
        kernels.get_backend("reference"))
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_legacy_multiframe_positions_are_stepped_along_the_normal(tmp_path, pool):
    base = ct_template()
    ds = copy.deepcopy(base)
    ds.NumberOfFrames = 3
    ds.SpacingBetweenSlices = 2.5
    ds.PixelData = np.stack([base.pixel_array] * 3).astype(np.int16).tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    p = _pipeline(tmp_path, pool)
    try:
        assert p.ingest_file(tmp_path / "mf.dcm").status == "stored"
        slices = p.store.pending_slices(p.store.due_series(time.time(), 0.0)[0])
        assert len(p.complete_series(quiet_s=0.0)) == 1
    finally:
        p.close()
    z = sorted(s.geom.position[2] for s in slices)
    assert np.allclose(np.diff(z), 2.5)


def test_dicomdir_file_brings_the_files_it_lists(tmp_path, pool):
    dicomdir = Path(pydicom.data.get_testdata_file("DICOMDIR"))
    p = _pipeline(tmp_path, pool)
    try:
        summary = p.ingest_tree(dicomdir)
    finally:
        p.close()
    assert summary["skipped"]["dicomdir"] == 1
    assert summary["stored"] >= 20  # the CT and MR series it references


def _dicomdir_tree(dest: Path, name: str, folders: bool = True) -> Path:
    """pydicom's DICOMDIR test tree copied to `dest`, the DICOMDIR renamed `name`."""
    dicomdir = Path(pydicom.data.get_testdata_file("DICOMDIR"))
    dest.mkdir()
    if folders:
        for sub in ("77654033", "98892001", "98892003"):
            shutil.copytree(dicomdir.parent / sub, dest / sub)
    shutil.copy(dicomdir, dest / name)
    return dest / name


def test_a_dicomdir_under_another_name_is_known_by_its_content(tmp_path, pool, caplog):
    # Issue 16.7: not named DICOMDIR, it was skipped alone (0 stored, 1 skipped).
    renamed = _dicomdir_tree(tmp_path / "media", "index.dcm")
    listed = {sop for sop, ok in map(_oracle, renamed.parent.rglob("*")) if ok}
    p = _pipeline(tmp_path, pool)
    caplog.set_level("INFO", logger="agent.ingest.pipeline")
    try:
        summary = p.ingest_tree(renamed)
    finally:
        p.close()
    assert summary["skipped"]["dicomdir"] == 1
    assert summary["stored"] == len(listed) >= 20  # every CT/MR image it references
    assert "a DICOMDIR: ingesting the 31 files it lists" in caplog.text
    assert "index.dcm" not in caplog.text  # the name of a file from outside is never logged


def test_a_dicomdir_whose_files_are_not_there_says_so(tmp_path, pool, caplog):
    lonely = _dicomdir_tree(tmp_path / "media", "index.dcm", folders=False)
    p = _pipeline(tmp_path, pool)
    try:
        summary = p.ingest_tree(lonely)
    finally:
        p.close()
    assert summary["stored"] == 0 and summary["skipped"] == {"dicomdir": 1}
    assert "the DICOMDIR: 0 references leave its folder (not followed), 31 name files that " \
           "are not there" in caplog.text


# ---------------------------------------------------------------------------- broken input


def _pixel_data_end(data: bytes) -> int:
    """Where the pixel data's bytes end. Both files carry trailing padding after it, and a
    copy cut inside that padding (or the encapsulation's end delimiter) still holds the whole
    image, so only cuts before this offset must fail."""
    delimiter = data.rfind(b"\xfe\xff\xdd\xe0")  # encapsulated: the sequence delimiter
    if delimiter >= 0:
        return delimiter
    raw = pydicom.dcmread(io.BytesIO(data)).get_item(0x7FE00010)
    return raw.value_tell + raw.length


def test_truncated_copies_are_quarantined_never_stored(tmp_path, pool):
    sources = {"ct": CT_SMALL.read_bytes(),
               "rle": Path(pydicom.data.get_testdata_file("MR_small_RLE.dcm")).read_bytes()}
    p = _pipeline(tmp_path, pool)
    reasons: dict[str, set[str]] = {}
    try:
        for label, data in sources.items():
            end = _pixel_data_end(data)
            step = max(1, end // 150)
            for cut in [*range(0, end, step), 1, 100, 131, end - 1]:
                f = tmp_path / "cut" / f"{label}-{cut}.dcm"
                f.parent.mkdir(exist_ok=True)
                f.write_bytes(data[:cut])
                o = p.ingest_file(f)
                assert o.status == "quarantined", (label, cut, o)
                reasons.setdefault(label, set()).add(o.reason)
        assert p.store.counts()["instances"] == 0
    finally:
        p.close()
    assert {"empty", "not_dicom", "truncated"} <= reasons["ct"]
    assert "truncated" in reasons["rle"] or "decode_failed" in reasons["rle"]


def test_non_dicom_files_are_quarantined_privately(tmp_path, pool):
    rng = np.random.default_rng(7)
    inputs = {
        "empty.dcm": b"",
        "random.bin": rng.bytes(5000),
        "notes.txt": b"Patient list\n" * 40,
        "fake_preamble.dcm": bytes(128) + b"DICM" + rng.bytes(300),
        "image.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(200),
        "ct.dcm.gz": gzip.compress(CT_SMALL.read_bytes()),
    }
    p = _pipeline(tmp_path, pool)
    try:
        outcomes = {}
        for name, data in inputs.items():
            (tmp_path / name).write_bytes(data)
            outcomes[name] = p.ingest_file(tmp_path / name)
        (tmp_path / "a_dir").mkdir()
        assert p.ingest_file(tmp_path / "a_dir").reason == "not_a_file"
        moved = p.ingest_file(tmp_path / "notes.txt", consume=True)
    finally:
        p.close()
    assert {o.status for o in outcomes.values()} == {"quarantined"}
    assert outcomes["empty.dcm"].reason == "empty"
    assert outcomes["random.bin"].reason == "not_dicom"
    assert moved.status == "quarantined" and not (tmp_path / "notes.txt").exists()
    q = tmp_path / "state" / "quarantine"
    held = sorted(q.rglob("*.dcm"))
    assert len(held) == len(inputs) + 1
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in held)
    assert stat.S_IMODE(q.stat().st_mode) == 0o700
    assert not any(f.stem in {"empty", "random", "notes"} for f in held)  # random names
    assert sorted(f.read_bytes() for f in held) == sorted([*inputs.values(), inputs["notes.txt"]])
    assert {f.parent.name for f in held} == {o.reason for o in outcomes.values()}


def _declared(tmp_path: Path, name: str, **attrs) -> Path:
    ds = ct_template()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = b"\x00" * 64
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def test_declared_sizes_are_checked_before_any_allocation(tmp_path, pool):
    huge = _declared(tmp_path, "huge.dcm", Rows=65535, Columns=65535, NumberOfFrames=999999999)
    big = _declared(tmp_path, "big.dcm", Rows=4096, Columns=4096, NumberOfFrames=2000)
    zero = _declared(tmp_path, "zero.dcm", Rows=0)
    short = _declared(tmp_path, "short.dcm")  # 64 bytes of pixel data for 128 x 128 x 2
    p = _pipeline(tmp_path, pool)
    try:
        tracemalloc.start()
        outcomes = [p.ingest_file(f) for f in (huge, big)]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert [o.reason for o in outcomes] == ["too_large", "too_large"]
        assert peak < 20 << 20
        assert p.ingest_file(zero).reason == "invalid_attribute:Rows"
        assert p.ingest_file(short).reason == "truncated"
    finally:
        p.close()


def test_deflate_bomb_is_too_large_before_pydicom_inflates_it(tmp_path, pool, monkeypatch):
    ds = ct_template()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    block = ds.private_block(0x0011, "BOMB", create=True)
    block.add_new(0x01, "OB", bytes(8 << 20))
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    assert (tmp_path / "bomb.dcm").stat().st_size < 200_000
    monkeypatch.setattr(dicom_read, "MAX_FILE_BYTES", 4 << 20)
    p = _pipeline(tmp_path, pool)
    try:
        assert p.ingest_file(tmp_path / "bomb.dcm").reason == "too_large"
    finally:
        p.close()


def test_unsupported_transfer_syntax_and_non_ct_mr(tmp_path, pool):
    ds = ct_template()
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    p = _pipeline(tmp_path, pool)
    try:
        assert p.ingest_file(tmp_path / "mpeg.dcm").reason == "unsupported_transfer_syntax"
        sc = Path(pydicom.data.get_testdata_file("SC_rgb_rle.dcm"))
        o = p.ingest_file(sc, consume=False)
        assert (o.status, o.reason) == ("skipped", "not_ct_mr:SecondaryCaptureImageStorage")
        assert sc.exists()
    finally:
        p.close()


# ---------------------------------------------------------------------------- worker isolation


def _rle_copy(tmp_path: Path, name: str) -> Path:
    [path] = write_series(tmp_path / name, 1, edit=lambda ds, k: ds.compress(
        RLELossless, np.frombuffer(ds.PixelData, np.int16).reshape(ds.Rows, ds.Columns)))
    return path.rename(path.with_name(f"{name}.dcm"))


def test_codec_crash_and_hang_cost_one_file_not_the_agent(tmp_path):
    pool = DecodePool(1, timeout_s=2.0, decode=_crash_or_stall)
    p = _pipeline(tmp_path, pool)
    try:
        crash = p.ingest_file(_rle_copy(tmp_path, "crash"))
        after_crash = p.ingest_file(_rle_copy(tmp_path, "fine1"))
        t0 = time.monotonic()
        stall = p.ingest_file(_rle_copy(tmp_path, "stall"))
        waited = time.monotonic() - t0
        after_stall = p.ingest_file(_rle_copy(tmp_path, "fine2"))
    finally:
        p.close()
        pool.close()
    assert (crash.status, crash.reason) == ("quarantined", "decode_crashed")
    assert after_crash.status == "stored"
    assert (stall.status, stall.reason) == ("quarantined", "decode_timeout") and waited < 10
    assert after_stall.status == "stored"
    assert pool.restarts == 2
    assert sorted(os.listdir(tmp_path / "state" / "quarantine")) == ["decode_crashed",
                                                                     "decode_timeout"]


# ---------------------------------------------------------------------------- the API


def test_consume_removes_stored_and_duplicate_inputs(tmp_path, pool):
    paths = write_series(tmp_path / "in", 2)
    again = tmp_path / "again.dcm"
    again.write_bytes(paths[0].read_bytes())
    p = _pipeline(tmp_path, pool)
    try:
        assert [p.ingest_file(x, source="cstore:PACS1", consume=True).status
                for x in [*paths, again]] == ["stored", "stored", "duplicate"]
    finally:
        p.close()
    assert not any(x.exists() for x in [*paths, again])


def test_concurrent_callers_store_each_instance_once(tmp_path, pool):
    paths = write_series(tmp_path / "in", 6)
    p = _pipeline(tmp_path, pool)
    try:
        threads = [threading.Thread(target=lambda: [p.ingest_file(x) for x in paths])
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = p.summary()
    finally:
        p.close()
    assert (s["stored"], s["duplicates"], s["instances"]) == (6, 18, 6)


def test_tree_progress_line_and_summary_shape(tmp_path, pool):
    write_series(tmp_path / "tree" / "a", 3)
    (tmp_path / "tree" / "junk.txt").write_text("x")
    (tmp_path / "tree" / ".hidden").write_text("x")
    os.symlink(CT_SMALL, tmp_path / "tree" / "link.dcm")
    stream = io.StringIO()
    p = _pipeline(tmp_path, pool)
    try:
        summary = p.ingest_tree(tmp_path / "tree", progress=True, stream=stream)
        p.complete_series(quiet_s=0.0)
        summary = p.summary()
    finally:
        p.close()
    assert stream.getvalue().endswith("ingest: 5/5 files, 3 stored, 0 duplicate, "
                                      "1 quarantined, 1 skipped\n")
    assert summary["stored"] == 3 and summary["quarantined"] == {"not_dicom": 1}
    assert summary["skipped"] == {"not_a_file": 1} and summary["series_complete"] == 1
    assert set(summary) >= {"stored", "duplicates", "skipped", "quarantined",
                            "series_complete", "series_invalid"}

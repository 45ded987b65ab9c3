"""Series assembly: pure ordering/validation rules, then the same rules through the pipeline."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.config import ImagingSpec
from agent.ingest import series as S
from agent.ingest.pipeline import IngestPipeline
from tests.test_dicom_helpers import SPEC, write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def geom(key: str, z: float, *, orientation=AXIAL, rows=16, columns=16, spacing=(0.5, 0.5),
         patient="p", modality="CT", xy=(0.0, 0.0)) -> S.SliceGeom:
    return S.SliceGeom(key=key, patient=patient, modality=modality, rows=rows, columns=columns,
                       position=(xy[0], xy[1], z), orientation=orientation,
                       pixel_spacing=spacing)


# ---------------------------------------------------------------------------- pure rules


def test_orders_by_position_along_normal_not_arrival():
    slices = [geom("c", 10.0), geom("a", 0.0), geom("b", 5.0)]
    check = S.check_series(slices)
    assert check.ok
    assert [check.slices[i].key for i in check.order] == ["a", "b", "c"]
    assert np.allclose(check.positions, [0.0, 5.0, 10.0])


def test_oblique_series_orders_along_its_own_normal():
    # Rotated 30 degrees about x: the normal is (0, -sin, cos); positions step along it while
    # z alone would order them differently once x/y offsets are added.
    a = np.deg2rad(30.0)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a)))
    normal = S.slice_normal(orientation)
    slices = []
    for i, k in enumerate([2, 0, 3, 1]):
        p = normal * 4.0 * k + np.array([50.0 * i, 0.0, 0.0])  # in-plane offsets do not count
        slices.append(S.SliceGeom(key=f"k{k}", patient="p", modality="CT", rows=8, columns=8,
                                  position=tuple(p), orientation=orientation,
                                  pixel_spacing=(1.0, 1.0)))
    check = S.check_series(slices)
    assert check.ok
    assert [check.slices[i].key for i in check.order] == ["k0", "k1", "k2", "k3"]
    assert np.allclose(np.diff(check.positions), 4.0)


def test_missing_slice_is_a_gap_above_one_and_a_half_median():
    zs = [0, 5, 10, 20, 25, 30]  # 15 is missing
    assert S.check_series([geom(str(z), z) for z in zs]).reason == S.MISSING_SLICE
    assert S.check_series([geom(str(z), z) for z in [0, 5, 15]]).reason == S.MISSING_SLICE
    assert S.check_series([geom(str(z), z) for z in [0, 5, 10, 15]]).ok
    # Small jitter in the spacing is not a missing slice.
    assert S.check_series([geom(str(z), z) for z in [0, 5.1, 9.9, 15.2, 20]]).ok


@pytest.mark.parametrize("changed", [
    {"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)},
    {"rows": 32},
    {"columns": 8},
    {"spacing": (0.7, 0.7)},
])
def test_mixed_geometry(changed):
    slices = [geom("a", 0.0), geom("b", 5.0), geom("c", 10.0, **changed)]
    assert S.check_series(slices).reason == S.MIXED_GEOMETRY


def test_duplicates_are_idempotent_and_same_position_is_not():
    a, b = geom("a", 0.0), geom("b", 5.0)
    check = S.check_series([a, b, a, b, a])
    assert check.ok and len(check.slices) == 2
    assert S.check_series([a, b, geom("c", 5.0)]).reason == S.DUPLICATE_POSITION


def test_single_slice_depends_on_depth_and_mixing_patients_is_refused():
    assert S.check_series([geom("a", 0.0)]).reason == S.SINGLE_SLICE
    assert S.check_series([geom("a", 0.0)], min_slices=1).ok
    assert S.check_series([geom("a", 0.0), geom("b", 5.0, patient="q")]).reason \
        == S.MIXED_PATIENT
    assert S.check_series([geom("a", 0.0), geom("b", 5.0, modality="MR")]).reason \
        == S.MIXED_MODALITY
    assert S.check_series([]).reason == S.EMPTY_SERIES


# ---------------------------------------------------------------------------- via the pipeline


@pytest.fixture
def pipeline(tmp_path):
    p = IngestPipeline(tmp_path / "state", SPEC, kernel_backend="reference")
    yield p
    p.close()


def _ingest(p: IngestPipeline, paths) -> list[str]:
    return [p.ingest_file(x).status for x in paths]


def test_series_with_missing_slice_is_invalid(pipeline, tmp_path):
    paths = write_series(tmp_path / "in", 6, skip=[3])
    assert _ingest(pipeline, paths) == ["stored"] * 5
    assert pipeline.complete_series(quiet_s=0.0) == []
    s = pipeline.summary()
    assert s["series_invalid"] == {"missing_slice": 1} and s["series_complete"] == 0
    # Invalid series drop their pending pixels too (removed in the background; close waits).
    pipeline.close()
    assert not list((tmp_path / "state" / "images" / "pending").iterdir())


def test_order_follows_position_not_instance_number(pipeline, tmp_path):
    paths = write_series(tmp_path / "in", 4, shuffle_instance_numbers=True)
    _ingest(pipeline, reversed(paths))  # arrival order reversed too
    done = pipeline.complete_series(quiet_s=0.0)
    assert len(done) == 1
    arr = np.load(pipeline.store.series_for_patients()[next(iter(
        pipeline.store.series_for_patients()))], allow_pickle=False)
    assert arr.shape == (SPEC.depth, SPEC.size, SPEC.size) and arr.dtype == np.float32
    # Each slice is the template + 100 * index (in stored units): brighter along z.
    means = arr.reshape(SPEC.depth, -1).mean(axis=1)
    assert np.all(np.diff(means) >= 0) and means[-1] > means[0]


def test_duplicates_are_no_ops_in_the_store(pipeline, tmp_path):
    paths = write_series(tmp_path / "in", 4)
    assert _ingest(pipeline, paths) == ["stored"] * 4
    assert _ingest(pipeline, paths) == ["duplicate"] * 4
    assert pipeline.store.counts()["instances"] == 4
    assert len(pipeline.complete_series(quiet_s=0.0)) == 1
    # Resent after completion: still duplicates, and the series stays complete.
    assert _ingest(pipeline, paths[:2]) == ["duplicate"] * 2
    assert pipeline.summary()["series_complete"] == 1


def test_quiet_period_and_late_instance(pipeline, tmp_path):
    paths = write_series(tmp_path / "in", 5, series_uid="1.2.826.0.1.3680043.8.498.1",
                         study_uid="1.2.826.0.1.3680043.8.498.2")
    _ingest(pipeline, paths[:4])
    now = time.time()
    assert pipeline.complete_series(quiet_s=60.0, now=now) == []  # still receiving
    assert pipeline.summary()["series_pending"] == 1
    assert len(pipeline.complete_series(quiet_s=60.0, now=now + 61.0)) == 1
    late = pipeline.ingest_file(paths[4])
    assert (late.status, late.reason) == ("quarantined", "series_closed")


def test_without_a_plan_series_wait_for_one(tmp_path):
    p = IngestPipeline(tmp_path / "state", None, kernel_backend="reference")
    try:
        _ingest(p, write_series(tmp_path / "in", 3))
        assert p.complete_series(quiet_s=0.0) == []
        assert p.summary()["series_pending"] == 1
        p.set_imaging(ImagingSpec(modality="CT", depth=2, size=8))
        assert len(p.complete_series(quiet_s=0.0)) == 1
        [path] = p.store.series_for_patients(ImagingSpec(modality="CT", depth=2, size=8)) \
            .values()
        assert np.load(path, allow_pickle=False).shape == (2, 8, 8)
        assert p.store.series_for_patients(SPEC) == {}  # another grid: not offered
    finally:
        p.close()


def test_pending_slices_survive_a_restart(tmp_path):
    paths = write_series(tmp_path / "in", 4)
    p = IngestPipeline(tmp_path / "state", SPEC, kernel_backend="reference")
    _ingest(p, paths[:2])
    p.close()
    p = IngestPipeline(tmp_path / "state", SPEC, kernel_backend="reference")
    try:
        assert _ingest(p, paths) == ["duplicate", "duplicate", "stored", "stored"]
        assert len(p.complete_series(quiet_s=0.0)) == 1
        assert p.store.counts()["pending_slices"] == 0
    finally:
        p.close()


def test_latest_complete_series_per_patient(pipeline, tmp_path):
    first = write_series(tmp_path / "a", 3, patient_id="P-7")
    _ingest(pipeline, first)
    pipeline.complete_series(quiet_s=0.0, now=time.time())
    second = write_series(tmp_path / "b", 3, patient_id="P-7", dz=2.5)
    _ingest(pipeline, second)
    [newest] = pipeline.complete_series(quiet_s=0.0, now=time.time() + 1.0)
    [path] = pipeline.store.series_for_patients().values()
    assert path.name == f"{newest}.npy"

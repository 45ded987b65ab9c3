"""preprocess_series: slices (stored values + rescale + position) -> the model's image grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kernels
from agent.config import ImagingSpec
from agent.ingest.preprocess import SliceInput, preprocess_series

REF = kernels.get_backend("reference")
USABLE = [n for n, reason in kernels.available_backends().items() if reason is None]
SPEC = ImagingSpec(depth=5, size=8, window_center=40.0, window_width=400.0)


def series(seed, positions, shape=(12, 10)):
    rng = np.random.default_rng(seed)
    return [SliceInput(pixels=rng.integers(700, 1400, shape).astype(np.int16), slope=1.0,
                       intercept=-1024.0, position=p) for p in positions]


@pytest.mark.parametrize("name", USABLE)
def test_matches_slice_then_depth_kernels(name):
    k = kernels.get_backend(name)
    slices = series(1, [-4.0, -1.5, 0.0, 3.0])
    out = preprocess_series(slices, SPEC, k)
    assert out.dtype == np.float32 and out.shape == (5, 8, 8)
    planes = np.stack([REF.preprocess_slice(s.pixels, 1.0, -1024.0, 40.0, 400.0, 8, 8)
                       for s in slices])
    want = REF.resample_depth(planes, np.array([-4.0, -1.5, 0.0, 3.0]), 5)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
    assert 0.0 <= out.min() and out.max() <= 1.0 and 0 < out.mean() < 1


def test_each_slice_uses_its_own_rescale():
    """Two encodings of the same HU values (different slope/intercept) give the same plane."""
    hu = np.random.default_rng(2).integers(-150, 250, (8, 8))
    a = SliceInput((hu + 1024).astype(np.uint16), 1.0, -1024.0, 0.0)
    b = SliceInput(((hu + 2000) * 2).astype(np.int32), 0.5, -2000.0, 2.0)
    out = preprocess_series([a, b], ImagingSpec(depth=3, size=8, window_center=50.0,
                                                window_width=400.0), REF)
    np.testing.assert_allclose(out[0], out[2], rtol=0, atol=1e-7)
    np.testing.assert_allclose(out[1], out[0], atol=1e-7)  # the midpoint of two equal planes
    assert (out[0] > 0).any() and (out[0] < 1).any()


def test_uneven_spacing_interpolates_by_position():
    """Constant slices at 0, 1, 3 (HU 0, 100, 300) onto depth 4 -> HU 0, 100, 200, 300."""
    slices = [SliceInput(np.full((4, 4), v, np.int16), 1.0, 0.0, p)
              for v, p in ((0, 0.0), (100, 1.0), (300, 3.0))]
    out = preprocess_series(slices, ImagingSpec(depth=4, size=2, window_center=200.0,
                                                window_width=800.0), REF)
    np.testing.assert_allclose(out[:, 0, 0], (np.array([0, 100, 200, 300]) + 200) / 800,
                               rtol=1e-6)


def test_single_slice_repeats():
    out = preprocess_series(series(3, [7.5]), SPEC, REF)
    assert out.shape == (5, 8, 8)
    assert all(np.array_equal(plane, out[0]) for plane in out)


@pytest.mark.parametrize("positions", [[], [0.0, 1.0, 1.0], [2.0, 1.0], [0.0, float("nan")]],
                         ids=["empty", "duplicate", "decreasing", "nan"])
def test_rejects_bad_series(positions):
    with pytest.raises(ValueError):
        preprocess_series(series(4, positions), SPEC, REF)


def test_rejects_non_finite_rescale_and_leaves_input_alone():
    slices = series(5, [0.0, 1.0])
    saved = [s.pixels.copy() for s in slices]
    preprocess_series(slices, SPEC, REF)
    for before, s in zip(saved, slices, strict=True):
        np.testing.assert_array_equal(before, s.pixels)
    bad = [slices[0], dataclasses.replace(slices[1], slope=float("inf"))]
    with pytest.raises(ValueError, match="slope"):
        preprocess_series(bad, SPEC, REF)
    with pytest.raises(dataclasses.FrozenInstanceError):
        slices[0].position = 3.0  # type: ignore[misc]


def test_eight_bit_pixels_widen_and_others_are_refused():
    hu = np.arange(64).reshape(8, 8)
    as_u8 = [SliceInput(hu.astype(np.uint8), 1.0, 0.0, 0.0)]
    as_i16 = [SliceInput(hu.astype(np.int16), 1.0, 0.0, 0.0)]
    spec = ImagingSpec(depth=1, size=8, window_center=32.0, window_width=64.0)
    np.testing.assert_array_equal(preprocess_series(as_u8, spec, REF),
                                  preprocess_series(as_i16, spec, REF))
    with pytest.raises(TypeError):
        preprocess_series([SliceInput(hu.astype(np.float64), 1.0, 0.0, 0.0)], spec, REF)

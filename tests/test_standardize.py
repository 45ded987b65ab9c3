"""Federated standardisation: merged moments must equal pooled statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.learn.standardize import (
    Moments,
    MomentsStream,
    apply_standardization,
    local_moments,
    merge_moments,
    standardizer,
)


def make_data(rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """Numeric columns with very different means/scales, one-hot columns, and holes."""
    x = np.column_stack([
        rng.normal(72.0, 13.0, n),  # age
        rng.integers(0, 2, n).astype(float),  # one-hot pair
        np.zeros(n),
        rng.lognormal(4.5, 0.7, n),  # minutes
        rng.normal(1e4, 2.0, n),  # large mean, small spread
    ])
    x[:, 2] = 1.0 - x[:, 1]
    x[rng.random((n, 5)) < 0.1] = np.nan
    return x


NUMERIC = (0, 3, 4)


def assert_moments_close(a: Moments, b: Moments) -> None:
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_allclose(a.total, b.total, rtol=1e-12)
    np.testing.assert_allclose(a.total_sq, b.total_sq, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_parts=st.integers(1, 6))
def test_merged_moments_of_a_random_split_equal_moments_of_the_whole(seed, n_parts):
    rng = np.random.default_rng(seed)
    x = make_data(rng, int(rng.integers(1, 200)))
    cuts = np.sort(rng.integers(0, len(x) + 1, n_parts - 1))
    parts = [local_moments(p) for p in np.split(x, cuts)]  # some parts may be empty
    assert_moments_close(merge_moments(parts), local_moments(x))


def test_merge_is_permutation_invariant_and_does_not_mutate():
    rng = np.random.default_rng(1)
    parts = [local_moments(make_data(rng, n)) for n in (10, 200, 37)]
    before = [p.to_vector().copy() for p in parts]
    assert_moments_close(merge_moments(parts), merge_moments(parts[::-1]))
    for p, v in zip(parts, before, strict=True):
        np.testing.assert_array_equal(p.to_vector(), v)


def test_standardizer_matches_numpy_on_pooled_data():
    rng = np.random.default_rng(2)
    sites = [make_data(rng, n) for n in (500, 120, 40)]
    mean, scale = standardizer(merge_moments([local_moments(s) for s in sites]), NUMERIC)
    pooled = np.vstack(sites)
    np.testing.assert_allclose(mean[list(NUMERIC)], np.nanmean(pooled[:, NUMERIC], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(scale[list(NUMERIC)], np.nanstd(pooled[:, NUMERIC], axis=0),
                               rtol=1e-6)  # column 4 has |mean| / std = 5000
    np.testing.assert_array_equal(mean[[1, 2]], [0.0, 0.0])
    np.testing.assert_array_equal(scale[[1, 2]], [1.0, 1.0])
    assert mean.dtype == scale.dtype == np.float64


def test_standardized_pooled_numeric_columns_have_zero_mean_unit_std():
    rng = np.random.default_rng(3)
    x = make_data(rng, 1000)
    mean, scale = standardizer(local_moments(x), NUMERIC)
    z = apply_standardization(x, mean, scale)
    present = ~np.isnan(x[:, NUMERIC])
    for j, col in enumerate(NUMERIC):
        values = z[present[:, j], col].astype(np.float64)
        assert abs(values.mean()) < 1e-5
        assert abs(values.std() - 1.0) < 1e-5


def test_nan_is_ignored_in_moments_and_becomes_zero_after_standardizing():
    x = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    m = local_moments(x)
    np.testing.assert_array_equal(m.count, [2.0, 0.0])
    np.testing.assert_array_equal(m.total, [4.0, 0.0])
    np.testing.assert_array_equal(m.total_sq, [10.0, 0.0])
    mean, scale = standardizer(m, (0, 1))
    np.testing.assert_array_equal(mean, [2.0, 0.0])
    np.testing.assert_array_equal(scale, [1.0, 1.0])  # std of [1, 3] is 1; all-NaN column -> 1
    z = apply_standardization(x, mean, scale)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("column", [
    [5.0, np.nan, np.nan],  # count < 2
    [70.0, 70.0, 70.0],  # constant
    [1e6 + 0.1] * 100,  # constant, but sumsq/n - mean^2 leaves rounding noise (~1e-3)
    [0.1] * 100,
])
def test_scale_is_one_for_too_few_values_or_constant_columns(column):
    x = np.array(column)[:, None]
    mean, scale = standardizer(local_moments(x), (0,))
    assert scale[0] == 1.0
    assert np.all(np.isfinite(apply_standardization(x, mean, scale)))


def test_apply_does_not_mutate_inputs_and_checks_shapes():
    x = np.array([[1.0, np.nan]])
    mean, scale = np.array([0.5, 0.0]), np.array([2.0, 1.0])
    apply_standardization(x, mean, scale)
    assert np.isnan(x[0, 1])
    with pytest.raises(ValueError):
        apply_standardization(x, mean[:1], scale)
    with pytest.raises(ValueError):
        apply_standardization(x, mean, np.array([0.0, 1.0]))


def test_vector_round_trip():
    m = local_moments(make_data(np.random.default_rng(4), 50))
    v = m.to_vector()
    assert v.dtype == np.float64 and v.shape == (15,)
    assert_moments_close(Moments.from_vector(v), m)


@pytest.mark.parametrize("vector", [
    np.zeros(4),
    np.zeros((2, 3)),
    np.array([1.0, np.nan, 1.0]),
    np.array([1.0, np.inf, 1.0]),
    np.array([-1.0, 0.0, 0.0]),
])
def test_from_vector_rejects_invalid(vector):
    with pytest.raises(ValueError):
        Moments.from_vector(vector)


def test_merge_rejects_empty_and_mismatched_widths():
    with pytest.raises(ValueError):
        merge_moments([])
    with pytest.raises(ValueError):
        merge_moments([local_moments(np.zeros((2, 2))), local_moments(np.zeros((2, 3)))])


def test_local_moments_rejects_non_matrix():
    with pytest.raises(ValueError):
        local_moments(np.zeros(3))


def test_standardizer_rejects_out_of_range_index():
    with pytest.raises(ValueError):
        standardizer(local_moments(np.ones((3, 2))), (2,))


def test_image_standardizer_matches_pooled_voxel_statistics_with_a_floor():
    from agent.learn.standardize import IMAGE_SCALE_FLOOR, image_standardizer

    rng = np.random.default_rng(11)
    images = rng.random((30, 2, 4, 4)).astype(np.float32)
    images[:, 0, 0, 0] = 1.0  # a constant voxel (clipped bone): its scale is the floor
    flat = images.reshape(30, -1).astype(np.float64)
    parts = [local_moments(flat[:7]), local_moments(flat[7:19]), local_moments(flat[19:])]
    mean, scale = image_standardizer(merge_moments(parts))
    assert mean.dtype == np.float32 and scale.shape == (32,)
    assert np.allclose(mean, flat.mean(0), rtol=1e-6)
    assert np.allclose(scale[1:], np.maximum(flat.std(0)[1:], IMAGE_SCALE_FLOOR), rtol=1e-5)
    assert scale[0] == pytest.approx(IMAGE_SCALE_FLOOR)


def test_moments_streamed_in_any_pieces_sum_like_merge():
    rng = np.random.default_rng(11)
    parts = [local_moments(make_data(rng, n)) for n in (120, 40, 300)]
    pooled = np.zeros(3 * parts[0].width)
    for p in parts:
        body = p.to_vector().astype("<f8").tobytes()
        stream = MomentsStream(pooled, columns=parts[0].width)
        cuts = sorted(rng.integers(0, len(body), 7))
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
            stream.feed(body[a:b])
        stream.finish()
        assert stream.largest_count == p.count.max()
    want = merge_moments(parts)
    got = Moments.from_vector(pooled)
    for name in ("count", "total", "total_sq"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12)


def test_a_cut_or_bad_moments_stream_adds_whole_clean_columns_only():
    m = local_moments(make_data(np.random.default_rng(12)))
    body = m.to_vector().astype("<f8").tobytes()
    pooled = np.zeros(3 * m.width)
    stream = MomentsStream(pooled, columns=m.width)
    stream.feed(body[:24 * 2 + 10])  # two whole columns and a piece of the third
    with pytest.raises(ValueError, match="ended after 2 of 5"):
        stream.finish()
    np.testing.assert_array_equal(pooled[:6], m.to_vector()[:6])
    assert not pooled[6:].any()
    bad = m.to_vector()
    bad[3 * 3] = -1.0  # column 3's count
    pooled[:] = 0
    stream = MomentsStream(pooled, columns=m.width)
    with pytest.raises(ValueError, match="negative counts"):
        stream.feed(bad.astype("<f8").tobytes())
    assert not pooled.any()  # refused before any column of that piece was added
    with pytest.raises(ValueError, match="longer"):
        MomentsStream(np.zeros(3), columns=1).feed(bytes(48))

"""Clipping and noise of the Gaussian mechanism (agent/privacy/dp.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.privacy.dp import clip_to_norm, gaussian_noise, secure_rng, site_noise_std


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.floats(-12, 6), st.floats(1e-6, 1e3), st.integers(0, 2**32))
def test_a_clipped_update_has_norm_at_most_clip(n, log_scale, clip, seed):
    delta = (np.random.default_rng(seed).standard_normal(n) * 10.0 ** log_scale
             ).astype(np.float32)
    out, norm = clip_to_norm(delta, clip)
    assert np.linalg.norm(out.astype(np.float64)) <= clip * (1 + 1e-6)
    assert norm == np.linalg.norm(delta.astype(np.float64))
    if norm <= clip:
        np.testing.assert_array_equal(out, delta)  # within the bound: untouched
    else:  # same direction
        cos = float(out.astype(np.float64) @ delta / (np.linalg.norm(out) * norm))
        assert cos > 1 - 1e-6


def test_site_shares_of_noise_add_up_to_sigma_clip():
    sigma, clip, sites, n = 1.3, 0.7, 5, 400_000
    std = site_noise_std(sigma, clip, sites)
    total = sum(gaussian_noise(n, std).astype(np.float64) for _ in range(sites))
    # the sample std of n normals is within 5 standard errors (1/sqrt(2n)) of the truth
    assert abs(total.std() / (sigma * clip) - 1) < 5 / np.sqrt(2 * n)


def test_secure_rng_and_noise_streams_are_fresh():
    a, b = secure_rng().random(8), secure_rng().random(8)
    assert not np.array_equal(a, b)
    assert not np.array_equal(gaussian_noise(8, 1.0), gaussian_noise(8, 1.0))


def test_the_noise_is_normal():
    """Kolmogorov-Smirnov against N(0, 1) on 200 000 draws: false-alarm rate 1e-4 (the
    critical value 2.0 / sqrt(n) at that level, Smirnov's asymptotic distribution)."""
    import math

    x = np.sort(gaussian_noise(200_000, 1.0).astype(np.float64))
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    i = np.arange(1, x.size + 1)
    d = max(np.max(i / x.size - cdf), np.max(cdf - (i - 1) / x.size))
    assert d < 2.0 / math.sqrt(x.size)

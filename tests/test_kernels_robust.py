"""Robust aggregation kernels (issue 12): the oracle against independent ones, multi-Krum's
selection, and every backend equal to the oracle.

The numpy oracle is checked against np.median, scipy.stats.trim_mean, scipy's cdist and
np.linalg.norm. Then the fast backends must give the oracle's median bit for bit, its trimmed
mean within one float32 ulp (in practice equal), its float64 distances and norms to 1e-10, on
seeded random inputs (k odd and even, 1 to 64 sites, n not a multiple of any block width, and
inputs full of ties), and refuse the same bad inputs with the same words.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist

import kernels
from kernels import ref_robust
from kernels import reference as ref

F32 = np.float32

# (sites k, parameters n): k = 1, 2, 3, 10, ...; n spans several blocks / sum chunks and is no
# multiple of the block widths (2048 for small k, 816 for k = 10) or of the chunk (4096).
SHAPES = [(1, 1), (1, 5003), (2, 5003), (3, 4099), (4, 777), (10, 10007), (11, 3001),
          (64, 1234)]


def updates(k: int, n: int, seed: int = 0, ties: bool = False) -> np.ndarray:
    """Seeded [k, n] float32 updates, sites at different scales and offsets (never all zero);
    with `ties`, small integers so many values repeat within a column."""
    rng = np.random.default_rng(seed * 1000 + k * 7 + n)
    if ties:
        return rng.integers(-3, 4, size=(k, n)).astype(F32)
    scale = rng.uniform(0.01, 2.0, size=(k, 1))
    shift = rng.normal(0, 0.1, size=(k, 1))
    return (rng.standard_normal((k, n)) * scale + shift).astype(F32)


def trims(k: int) -> list[int]:
    return sorted({0, 1, (k - 1) // 2} & set(range((k + 1) // 2)))


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_reference_median_is_numpys(k, n, ties):
    u = updates(k, n, ties=ties)
    got = ref.coordinate_median(u)
    assert got.dtype == F32 and got.shape == (n,)
    np.testing.assert_array_equal(got, np.median(u, axis=0))


@pytest.mark.parametrize("k,n", SHAPES)
def test_reference_trimmed_mean_is_scipys(k, n):
    u = updates(k, n)
    for t in trims(k):
        got = ref.trimmed_mean(u, t)
        assert got.dtype == F32 and got.shape == (n,)
        # scipy cuts int(proportion * k) from each end; (t + 0.5) / k makes that exactly t.
        want = stats.trim_mean(u.astype(np.float64), (t + 0.5) / k, axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_trimmed_mean_ends_between_mean_and_median():
    u = updates(7, 500)
    np.testing.assert_array_max_ulp(ref.trimmed_mean(u, 0),
                                    u.astype(np.float64).mean(axis=0).astype(F32), 1)
    np.testing.assert_array_equal(ref.trimmed_mean(u, 3), ref.coordinate_median(u))


def test_median_and_trimmed_mean_ignore_a_minority_of_huge_updates():
    honest = updates(5, 300)
    bad = np.full((2, 300), F32(1e30))
    u = np.ascontiguousarray(np.concatenate([honest, bad]))
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    for agg in (ref.coordinate_median(u), ref.trimmed_mean(u, 2)):
        assert np.all((agg >= lo) & (agg <= hi))
    assert np.all(u.mean(axis=0) > 1e29)  # what FedAvg would have done


@pytest.mark.parametrize("k,n", SHAPES)
def test_reference_distances_and_norms_are_scipys_and_numpys(k, n):
    u = updates(k, n)
    x = u.astype(np.float64)
    d2 = ref.pairwise_sq_distances(u)
    assert d2.dtype == np.float64 and d2.shape == (k, k)
    np.testing.assert_allclose(d2, cdist(x, x, "sqeuclidean"), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.l2_norms(u), np.linalg.norm(x, axis=1), rtol=1e-12)


def test_clip_to_norm_scales_only_what_is_too_long():
    x = updates(1, 1000)[0]
    u = np.ascontiguousarray(np.stack([4 * x, x]))
    norms = np.linalg.norm(u.astype(np.float64), axis=1)
    bound = 2 * float(norms[1])  # the first is twice too long, the second within
    long, short = u[0].copy(), u[1].copy()
    assert ref.clip_to_norm(long, bound) == pytest.approx(norms[0], rel=1e-12)
    assert np.linalg.norm(long.astype(np.float64)) == pytest.approx(bound, rel=1e-6)
    np.testing.assert_allclose(long, u[0] / 2, rtol=1e-6)
    assert ref.clip_to_norm(short, bound) == pytest.approx(norms[1], rel=1e-12)
    np.testing.assert_array_equal(short, u[1])
    zero = np.zeros(10, F32)
    assert ref.clip_to_norm(zero, 1.0) == 0.0 and not zero.any()


# ---------------------------------------------------------------------------- multi-Krum


def test_krum_scores_on_a_line_with_ties_lowest_index_first():
    # Points 0, 1, 2, 3, 100 on a line; k=5, f=1: each score sums the 2 nearest squared
    # distances: 0 -> 1+4 = 5, 1 -> 1+1 = 2, 2 -> 2, 3 -> 1+4 = 5, 100 -> 97^2 + 98^2.
    u = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]], F32)
    d2 = ref.pairwise_sq_distances(u)
    assert ref_robust.multi_krum_select(d2, 1, 5) == [1, 2, 0, 3, 4]
    assert ref_robust.multi_krum_select(d2, 1, 1) == [1]
    # Reversed order of the points: ties still go to the lower index.
    rev = np.ascontiguousarray(u[::-1])
    assert ref_robust.multi_krum_select(ref.pairwise_sq_distances(rev), 1, 5) == [2, 3, 1, 4, 0]


def test_multi_krum_never_selects_far_outliers():
    rng = np.random.default_rng(5)
    honest = rng.normal(0, 0.01, size=(9, 2000)).astype(F32)
    outliers = rng.normal(5, 0.01, size=(3, 2000)).astype(F32)
    order = rng.permutation(12)
    u = np.ascontiguousarray(np.concatenate([honest, outliers])[order])
    bad = {int(i) for i in np.flatnonzero(order >= 9)}
    d2 = ref.pairwise_sq_distances(u)
    for m in range(1, 10):
        chosen = ref_robust.multi_krum_select(d2, 3, m)
        assert len(chosen) == len(set(chosen)) == m and not bad & set(chosen), (m, chosen)
    assert set(ref_robust.multi_krum_select(d2, 3, 12)[9:]) == bad  # they score worst


def test_multi_krum_refuses_what_it_cannot_tolerate():
    d2 = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 4 updates, got 4"):
        ref_robust.multi_krum_select(d2, 1, 1)
    assert ref_robust.multi_krum_select(d2, 0, 4) == [0, 1, 2, 3]
    for f, m, match in [(0, 0, "m must be an integer >= 1"), (0, 5, "cannot select m=5"),
                        (-1, 1, "f must be an integer >= 0"), (True, 1, "f must be")]:
        with pytest.raises(ValueError, match=match):
            ref_robust.multi_krum_select(d2, f, m)
    for bad in (np.zeros((4, 3)), np.zeros(4), np.zeros((4, 4), F32), [[0.0]]):
        with pytest.raises(ValueError, match="d2 must be a square float64"):
            ref_robust.multi_krum_select(bad, 0, 1)
    with pytest.raises(ValueError, match="NaN"):
        ref_robust.multi_krum_select(np.full((4, 4), np.nan), 0, 1)


# ---------------------------------------------------------------------------- sorting network


@pytest.mark.skipif(kernels.available_backends()["cpu"] is not None, reason="no numba")
@pytest.mark.parametrize("k", range(1, 17))
def test_batcher_network_sorts_every_zero_one_input(k):
    """0-1 principle: a comparator network sorting all 2^k inputs of zeros and ones sorts
    everything; its pruned median network gets the middle positions right."""
    from kernels import cpu_robust

    x = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1).T.copy()  # [k, 2^k]
    want = np.sort(x, axis=0)
    net = cpu_robust.batcher_network(k)
    mid = {(k - 1) // 2, k // 2}
    pruned = cpu_robust.prune(net, mid)
    assert len(pruned) <= len(net)
    for pairs, rows in ((net, range(k)), (pruned, sorted(mid))):
        y = x.copy()
        for a, b in pairs:
            assert 0 <= a < b < k
            y[a], y[b] = np.minimum(y[a], y[b]), np.maximum(y[a], y[b])
        np.testing.assert_array_equal(y[list(rows)], want[list(rows)])


# ---------------------------------------------------------------------------- backends


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_order_statistics_match_reference(backend, k, n, ties):
    _, kb = backend
    u = updates(k, n, seed=1, ties=ties)
    kept = u.copy()
    got = kb.coordinate_median(u)
    assert got.dtype == F32 and got.shape == (n,)
    np.testing.assert_array_equal(got, ref.coordinate_median(u))
    for t in trims(k):
        got = kb.trimmed_mean(u, t)
        assert got.dtype == F32 and got.shape == (n,)
        np.testing.assert_array_max_ulp(got, ref.trimmed_mean(u, t), 1)
    np.testing.assert_array_equal(u, kept)  # inputs are not sorted in place


@pytest.mark.parametrize("k,n", SHAPES)
def test_distances_and_norms_match_reference(backend, k, n):
    _, kb = backend
    u = updates(k, n, seed=2)
    d2 = kb.pairwise_sq_distances(u)
    assert d2.dtype == np.float64 and d2.shape == (k, k)
    np.testing.assert_allclose(d2, ref.pairwise_sq_distances(u), rtol=1e-10)
    assert np.all(np.diag(d2) == 0) and np.array_equal(d2, d2.T)
    norms = kb.l2_norms(u)
    assert norms.dtype == np.float64 and norms.shape == (k,)
    np.testing.assert_allclose(norms, ref.l2_norms(u), rtol=1e-10)
    if k > 2:  # the shared selection sees the same ranking from either backend's distances
        assert ref_robust.multi_krum_select(d2, 0, k) == ref_robust.multi_krum_select(
            ref.pairwise_sq_distances(u), 0, k)


@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_clip_to_norm_matches_reference(backend, n):
    _, kb = backend
    x = updates(1, n, seed=3)[0]
    norm = float(np.linalg.norm(x.astype(np.float64)))
    for bound in (norm / 3, norm * 2):
        a, b = x.copy(), x.copy()
        assert kb.clip_to_norm(a, bound) == pytest.approx(ref.clip_to_norm(b, bound),
                                                          rel=1e-10)
        np.testing.assert_allclose(a, b, rtol=1e-6)
    a = x.copy()
    kb.clip_to_norm(a, norm * 2)
    np.testing.assert_array_equal(a, x)  # within the bound: untouched


def _bad_calls(k):
    u4 = updates(4, 10)
    ro = updates(1, 10)[0]
    ro.flags.writeable = False
    return [
        (lambda: k.trimmed_mean(u4, 2), ValueError, r"trim 2 from each end of 4 updates"),
        (lambda: k.trimmed_mean(updates(1, 10), 1), ValueError, "need 2 \\* trim < k"),
        (lambda: k.trimmed_mean(u4, -1), ValueError, "trim must be an integer >= 0"),
        (lambda: k.trimmed_mean(u4, 1.0), ValueError, "trim must be an integer"),
        (lambda: k.trimmed_mean(u4, True), ValueError, "trim must be an integer"),
        (lambda: k.coordinate_median(np.zeros((0, 5), F32)), ValueError, "at least one update"),
        (lambda: k.coordinate_median(np.zeros(5, F32)), ValueError, "must be 2-D"),
        (lambda: k.pairwise_sq_distances(np.zeros((2, 2, 2), F32)), ValueError, "must be 2-D"),
        (lambda: k.l2_norms(np.zeros((2, 3))), TypeError, "must be float32, got float64"),
        (lambda: k.coordinate_median(u4.T), ValueError, "C-contiguous"),
        (lambda: k.trimmed_mean([[1.0]], 0), TypeError, "must be a"),
        (lambda: k.clip_to_norm(updates(1, 10)[0], 0.0), ValueError, "max_norm must be"),
        (lambda: k.clip_to_norm(updates(1, 10)[0], float("nan")), ValueError, "max_norm"),
        (lambda: k.clip_to_norm(updates(1, 10)[0], -1), ValueError, "max_norm"),
        (lambda: k.clip_to_norm(updates(2, 10), 1.0), ValueError, "update must be 1-D"),
        (lambda: k.clip_to_norm(ro, 1.0), ValueError, "read-only"),
    ]


def test_backends_refuse_what_the_reference_refuses(backend):
    _, kb = backend
    for (call, exc, match), (ref_call, _, _) in zip(_bad_calls(kb), _bad_calls(ref),
                                                    strict=True):
        with pytest.raises(exc, match=match):
            ref_call()
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.skipif(kernels.available_backends()["cpu"] is not None, reason="no numba")
def test_warm_kernels_compiles_the_robust_loops():
    """`fedsilo warm-cache` leaves every serial and parallel robust loop compiled, so the
    coordinator's first robust round does not wait for the JIT."""
    code = (
        "from agent.learn.warm import warm_kernels\n"
        "from numba.core.registry import CPUDispatcher\n"
        "from kernels import cpu_robust\n"
        "warm_kernels()\n"
        "for name, f in sorted(vars(cpu_robust).items()):\n"
        "    if isinstance(f, CPUDispatcher) and name.endswith(('_serial', '_parallel')):\n"
        "        print(name, len(f.signatures))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=180)
    counts = dict(line.split() for line in out.stdout.splitlines())
    assert len(counts) == 8, counts
    assert all(c == "1" for c in counts.values()), counts


def test_zero_parameters_give_empty_results(backend):
    _, kb = backend
    u = np.zeros((3, 0), F32)
    assert kb.coordinate_median(u).shape == kb.trimmed_mean(u, 1).shape == (0,)
    np.testing.assert_array_equal(kb.pairwise_sq_distances(u), np.zeros((3, 3)))
    np.testing.assert_array_equal(kb.l2_norms(u), np.zeros(3))
    assert kb.clip_to_norm(np.zeros(0, F32), 1.0) == 0.0

"""Every kernel backend against the plain-numpy oracle, plus the oracle against textbook math.

One `backend` fixture runs each test body on every fast backend (cpu serial loops, cpu with the
parallel loops forced on small inputs, gpu); unavailable ones skip with the registry's reason.
Inputs are seeded, non-zero and float32; outputs are checked for dtype and shape as well.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import kernels
from kernels import reference as ref

RTOL = 1e-5
F32 = np.float32


def rand(rng, *shape, scale=1.0):
    """Seeded normal float32 values with no exact zeros (a zero hides a missing term)."""
    a = rng.standard_normal(shape) * scale
    a[np.abs(a) < 1e-3] = 0.5
    return a.astype(F32)


def same(actual, expected, *, atol=0.0, rtol=RTOL):
    """Fast backend output matches the oracle in dtype, shape and value."""
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype == F32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- registry


def test_registry_reports_reasons():
    avail = kernels.available_backends()
    assert set(avail) == {"reference", "cpu", "gpu"}
    assert avail["reference"] is None
    for name, reason in avail.items():
        assert reason is None or reason.startswith(f"{name}: ")
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert avail["gpu"] == "gpu: cupy not installed"


def test_get_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="unknown kernel backend 'tpu'"):
        kernels.get_backend("tpu")
    for name, reason in kernels.available_backends().items():
        if reason is not None:
            with pytest.raises(ValueError, match=reason):
                kernels.get_backend(name)
        else:
            module = kernels.get_backend(name)
            assert all(callable(getattr(module, k)) for k in kernels.KERNEL_NAMES)


def test_auto_prefers_cpu_when_numba_imports():
    expected = "cpu" if kernels.available_backends()["cpu"] is None else "reference"
    assert kernels.get_backend("auto") is kernels.get_backend(expected)


def test_import_kernels_does_not_import_numba():
    code = "import sys, kernels; kernels.get_backend('reference'); print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- the oracle itself


def test_reference_matches_float64_math():
    """The oracle is checked against independent float64 formulas, so it cannot drift."""
    rng = np.random.default_rng(1)
    x, w, b, dy = rand(rng, 9, 5), rand(rng, 5, 3), rand(rng, 3), rand(rng, 9, 3)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    np.testing.assert_allclose(ref.dense_forward(x, w, b), x64 @ w64 + b, rtol=1e-5, atol=1e-5)
    dx, dw, db = ref.dense_backward(x, w, dy)
    for got, want in ((dx, dy64 @ w64.T), (dw, x64.T @ dy64), (db, dy64.sum(0))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    z = rand(rng, 40, scale=3)
    y = (rng.random(40) < 0.5).astype(F32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    np.testing.assert_allclose(ref.sigmoid(z), p, rtol=1e-6)
    loss, dz = ref.bce_with_logits(z, y)
    assert loss == pytest.approx(np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p)), rel=1e-6)
    np.testing.assert_allclose(dz, (p - y) / 40, rtol=1e-5, atol=1e-9)
    zk = rand(rng, 6, 4, scale=2)
    labels = rng.integers(0, 4, 6)
    e = np.exp(zk.astype(np.float64))
    sm = e / e.sum(1, keepdims=True)
    loss, dz = ref.softmax_cross_entropy(zk, labels)
    assert loss == pytest.approx(-np.mean(np.log(sm[np.arange(6), labels])), rel=1e-6)
    np.testing.assert_allclose(dz, (sm - np.eye(4)[labels]) / 6, rtol=1e-5, atol=1e-8)


def test_reference_stable_without_warnings():
    z = np.array([-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4], dtype=F32)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        p = ref.sigmoid(z)
        loss, dz = ref.bce_with_logits(z, np.ones_like(z))
        ref.softmax_cross_entropy(np.array([[1e4, -1e4, 0.0]], F32), np.array([1]))
    assert p[0] == 0.0 and p[-1] == 1.0 and p[3] == 0.5
    assert np.isfinite(loss) and np.all(np.isfinite(dz))


# ---------------------------------------------------------------------------- kernels vs oracle


@pytest.mark.parametrize("n,i,o", [(1, 1, 1), (37, 13, 7), (64, 40, 1)])
def test_dense_forward(backend, n, i, o):
    _, k = backend
    rng = np.random.default_rng(n * 100 + i)
    x, w, b = rand(rng, n, i), rand(rng, i, o), rand(rng, o)
    same(k.dense_forward(x, w, b), ref.dense_forward(x, w, b), atol=1e-5 * np.sqrt(i))


@pytest.mark.parametrize("n,i,o", [(1, 1, 1), (37, 13, 7), (64, 40, 1)])
def test_dense_backward(backend, n, i, o):
    _, k = backend
    rng = np.random.default_rng(n * 100 + i + 1)
    x, w, dy = rand(rng, n, i), rand(rng, i, o), rand(rng, n, o)
    got, want = k.dense_backward(x, w, dy), ref.dense_backward(x, w, dy)
    assert len(got) == 3
    for g, r, inner in zip(got, want, (o, n, n), strict=True):
        same(g, r, atol=1e-5 * np.sqrt(inner))


def test_dense_rejects_bad_input(backend):
    _, k = backend
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, 4, 3), rand(rng, 3, 2), rand(rng, 2)
    with pytest.raises(ValueError):
        k.dense_forward(x, rand(rng, 2, 2), b)
    with pytest.raises(TypeError):
        k.dense_forward(x.astype(np.float64), w, b)
    with pytest.raises(ValueError):
        k.dense_backward(x, w, rand(rng, 4, 3))


@pytest.mark.parametrize("shape", [(50,), (7, 9)])
def test_relu(backend, shape):
    _, k = backend
    rng = np.random.default_rng(4)
    z, da = rand(rng, *shape), rand(rng, *shape)
    same(k.relu_forward(z), ref.relu_forward(z))
    same(k.relu_backward(z, da), ref.relu_backward(z, da))


def test_sigmoid(backend):
    _, k = backend
    z = rand(np.random.default_rng(5), 200, scale=5)
    same(k.sigmoid(z), ref.sigmoid(z), atol=1e-7)


def test_sigmoid_huge_logits(backend):
    _, k = backend
    z = np.array([-1e4, -1e3, -100.0, 100.0, 1e3, 1e4], dtype=F32)
    p = k.sigmoid(z)
    assert p.dtype == F32 and np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [0, 0, 0, 1, 1, 1], atol=1e-30)  # exp(-100) is subnormal


def test_bce_with_logits(backend):
    _, k = backend
    rng = np.random.default_rng(6)
    z = rand(rng, 301, scale=4)
    y = (rng.random(301) < 0.4).astype(F32)
    loss, dz = k.bce_with_logits(z, y)
    want_loss, want_dz = ref.bce_with_logits(z, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(want_loss, rel=RTOL)
    same(dz, want_dz, atol=1e-9)


def test_bce_huge_logits(backend):
    _, k = backend
    z = np.array([1e4, -1e4, 50.0, -50.0], dtype=F32)
    y = np.array([0, 1, 1, 0], dtype=F32)
    loss, dz = k.bce_with_logits(z, y)
    assert loss == pytest.approx(5000.0, rel=1e-6)  # two confident misses of 1e4, two hits of ~0
    np.testing.assert_allclose(dz, [0.25, -0.25, 0.0, 0.0], atol=1e-12)


def test_softmax_cross_entropy(backend):
    _, k = backend
    rng = np.random.default_rng(7)
    z = rand(rng, 33, 5, scale=3)
    labels = rng.integers(0, 5, 33)
    loss, dz = k.softmax_cross_entropy(z, labels)
    want_loss, want_dz = ref.softmax_cross_entropy(z, labels)
    assert loss == pytest.approx(want_loss, rel=RTOL)
    same(dz, want_dz, atol=1e-8)


def test_softmax_huge_logits_and_bad_labels(backend):
    _, k = backend
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=F32)
    loss, dz = k.softmax_cross_entropy(z, np.array([0, 0]))
    # row 0 is right with certainty (loss 0); row 1 splits its mass over classes 1 and 2, so its
    # loss is logsumexp - z[label] = (1e4 + log 2) - (-1e4)
    assert loss == pytest.approx((2e4 + np.log(2)) / 2, rel=1e-9)
    np.testing.assert_allclose(dz, [[0, 0, 0], [-0.5, 0.25, 0.25]], atol=1e-7)
    with pytest.raises(ValueError):
        k.softmax_cross_entropy(z, np.array([0, 3]))


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.01)])
def test_sgd_momentum_steps(backend, momentum, wd):
    _, k = backend
    rng = np.random.default_rng(8)
    p0 = rand(rng, 257)
    p, v = p0.copy(), np.zeros_like(p0)
    rp, rv = p0.copy(), np.zeros_like(p0)
    for step in range(5):
        g = rand(rng, 257)
        k.sgd_momentum_step(p, g, v, 0.05, momentum, wd)
        ref.sgd_momentum_step(rp, g, rv, 0.05, momentum, wd)
        if step == 0 and momentum == 0.0:
            np.testing.assert_allclose(p, p0 - 0.05 * g, rtol=1e-6)  # plain SGD
    same(p, rp, atol=1e-6)
    same(v, rv, atol=1e-6)
    assert not np.allclose(p, p0)


def test_adam_steps(backend):
    _, k = backend
    rng = np.random.default_rng(9)
    p0 = rand(rng, 300)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    rp, rm, rv = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t in range(1, 7):
        g = rand(rng, 300)
        k.adam_step(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, t, 0.001)
        ref.adam_step(rp, g, rm, rv, 0.01, 0.9, 0.999, 1e-8, t, 0.001)
        if t == 1:
            # bias correction makes the first step lr * sign(g + wd*p), whatever |g| is
            np.testing.assert_allclose(p, p0 - 0.01 * np.sign(g + 0.001 * p0), rtol=1e-5,
                                       atol=1e-7)
    same(p, rp, atol=1e-6)
    same(m, rm, atol=1e-6)
    same(v, rv, atol=1e-7)
    with pytest.raises(ValueError):
        k.adam_step(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 0, 0.0)


def test_weighted_accumulate_unequal_weights(backend):
    _, k = backend
    rng = np.random.default_rng(10)
    xs = [rand(rng, 1000) for _ in range(3)]
    weights = [0.5, 0.2, 0.3]
    acc, racc = np.zeros(1000, F32), np.zeros(1000, F32)
    for x, wt in zip(xs, weights, strict=True):
        k.weighted_accumulate(acc, x, wt)
        ref.weighted_accumulate(racc, x, wt)
    same(acc, racc, atol=1e-6)
    expected = sum(wt * x.astype(np.float64) for x, wt in zip(xs, weights, strict=True))
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-6)


def test_in_place_kernels_reject_wrong_dtype(backend):
    name, k = backend
    p, g = np.ones(8, np.float64), np.ones(8, F32)
    with pytest.raises(TypeError):
        k.weighted_accumulate(p, g, 1.0)
    with pytest.raises(TypeError):
        k.sgd_momentum_step(p, g, np.zeros(8, F32), 0.1, 0.9, 0.0)
    with pytest.raises(ValueError):
        k.weighted_accumulate(np.ones(8, F32), np.ones(9, F32), 1.0)


def test_add_proximal(backend):
    _, k = backend
    rng = np.random.default_rng(12)
    g, p, a = rand(rng, 1031), rand(rng, 1031), rand(rng, 1031)
    want = g.copy()
    ref.add_proximal(want, p, a, 0.3)
    np.testing.assert_allclose(want, g + np.float32(0.3) * (p - a), rtol=1e-6)
    got = g.copy()
    k.add_proximal(got, p, a, 0.3)
    same(got, want, atol=1e-6)
    with pytest.raises(ValueError):
        k.add_proximal(got, p[:5], a, 0.3)

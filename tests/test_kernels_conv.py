"""CNN kernels (conv, 2x2 max-pool, global average pool) on every backend vs the oracle.

The oracle is checked against an index-by-index float64 loop and its backward passes against
central finite differences of the scalar sum(forward(x) * G) in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import reference as ref

F32 = np.float32


def rand(rng, *shape, dtype=F32):
    """Seeded normal values with no exact zeros (a zero hides a missing term)."""
    a = rng.standard_normal(shape)
    a[np.abs(a) < 1e-3] = 0.5
    return a.astype(dtype)


def same(actual, expected, *, atol):
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.flags.c_contiguous and expected.flags.c_contiguous
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol)


def fd(f, a, eps=1e-6):
    """Central finite differences of scalar f at every element of a (float64, mutated back)."""
    g = np.empty_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


# ---------------------------------------------------------------------------- the oracle


def test_reference_conv_matches_index_loop():
    rng = np.random.default_rng(1)
    x, w, b = rand(rng, 2, 3, 5, 4, dtype=np.float64), rand(rng, 2, 3, 3, 3, dtype=np.float64), \
        rand(rng, 2, dtype=np.float64)
    want = np.zeros((2, 2, 5, 4))
    for n in range(2):
        for f in range(2):
            for i in range(5):
                for j in range(4):
                    s = b[f]
                    for c in range(3):
                        for ky in range(3):
                            for kx in range(3):
                                ii, jj = i + ky - 1, j + kx - 1
                                if 0 <= ii < 5 and 0 <= jj < 4:
                                    s += w[f, c, ky, kx] * x[n, c, ii, jj]
                    want[n, f, i, j] = s
    np.testing.assert_allclose(ref.conv2d_forward(x, w, b), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_reference_conv_backward_finite_differences(k):
    rng = np.random.default_rng(k)
    x, w, b = (rand(rng, 2, 2, 5, 4, dtype=np.float64), rand(rng, 3, 2, k, k, dtype=np.float64),
               rand(rng, 3, dtype=np.float64))
    g = rand(rng, 2, 3, 5, 4, dtype=np.float64)

    def loss():
        return float((ref.conv2d_forward(x, w, b) * g).sum())

    dx, dw, db = ref.conv2d_backward(x, w, g)
    assert dx.dtype == dw.dtype == db.dtype == np.float64
    for got, wrt in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(got, fd(loss, wrt), rtol=1e-6, atol=1e-8)


def test_reference_pool_backward_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.permutation(96).reshape(2, 3, 4, 4).astype(np.float64)  # distinct: no ties to blur
    x += rng.uniform(-0.1, 0.1, x.shape)
    g = rand(rng, 2, 3, 2, 2, dtype=np.float64)
    y, arg = ref.maxpool2_forward(x)
    assert arg.dtype == np.int8 and arg.min() >= 0 and arg.max() <= 3
    np.testing.assert_array_equal(y, x.reshape(2, 3, 2, 2, 2, 2).max(axis=(3, 5)))
    dx = ref.maxpool2_backward(g, arg, x.shape)
    np.testing.assert_allclose(dx, fd(lambda: float((ref.maxpool2_forward(x)[0] * g).sum()), x),
                               rtol=1e-6, atol=1e-8)
    assert np.count_nonzero(dx) == g.size  # one winner per window
    ga = rand(rng, 2, 3, dtype=np.float64)
    da = ref.global_avgpool_backward(ga, x.shape)
    np.testing.assert_allclose(
        da, fd(lambda: float((ref.global_avgpool_forward(x) * ga).sum()), x), rtol=1e-6,
        atol=1e-8)
    np.testing.assert_allclose(ref.global_avgpool_forward(x), x.mean(axis=(2, 3)), rtol=1e-12)


# ---------------------------------------------------------------------------- backends vs oracle


CONV_SHAPES = [(1, 1, 1, 1, 1, 1), (3, 2, 6, 5, 4, 3), (2, 3, 8, 8, 2, 5), (2, 2, 2, 3, 3, 5),
               (5, 4, 12, 10, 6, 3)]


@pytest.mark.parametrize("n,c,h,w,f,k", CONV_SHAPES)
def test_conv2d_forward(backend, n, c, h, w, f, k):
    _, kn = backend
    rng = np.random.default_rng(n * 1000 + h * 10 + k)
    x, wt, b = rand(rng, n, c, h, w), rand(rng, f, c, k, k), rand(rng, f)
    same(kn.conv2d_forward(x, wt, b), ref.conv2d_forward(x, wt, b), atol=1e-5 * np.sqrt(c * k * k))


@pytest.mark.parametrize("n,c,h,w,f,k", CONV_SHAPES)
def test_conv2d_backward(backend, n, c, h, w, f, k):
    _, kn = backend
    rng = np.random.default_rng(n * 1000 + h * 10 + k + 1)
    x, wt, g = rand(rng, n, c, h, w), rand(rng, f, c, k, k), rand(rng, n, f, h, w)
    got, want = kn.conv2d_backward(x, wt, g), ref.conv2d_backward(x, wt, g)
    assert len(got) == 3
    for a, r, terms in zip(got, want, (f * k * k, n * h * w, n * h * w), strict=True):
        same(a, r, atol=1e-5 * np.sqrt(terms))


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 4, 6, 8), (2, 5, 10, 4)])
def test_maxpool2(backend, shape):
    _, kn = backend
    rng = np.random.default_rng(sum(shape))
    x = rand(rng, *shape)
    y, arg = kn.maxpool2_forward(x)
    ry, rarg = ref.maxpool2_forward(x)
    same(y, ry, atol=0)
    assert arg.dtype == rarg.dtype == np.int8 and arg.flags.c_contiguous
    np.testing.assert_array_equal(arg, rarg)
    g = rand(rng, *ry.shape)
    same(kn.maxpool2_backward(g, arg, x.shape), ref.maxpool2_backward(g, rarg, x.shape), atol=0)


def test_maxpool2_ties_pick_first_cell(backend):
    _, kn = backend
    x = np.array([[[[1, 1, 0, 2], [1, 1, 2, 2]]]], dtype=F32)
    y, arg = kn.maxpool2_forward(x)
    np.testing.assert_array_equal(y, [[[[1, 2]]]])
    np.testing.assert_array_equal(arg, [[[[0, 1]]]])
    dx = kn.maxpool2_backward(np.array([[[[5, 7]]]], F32), arg, x.shape)
    np.testing.assert_array_equal(dx, [[[[5, 0, 0, 7], [0, 0, 0, 0]]]])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 3, 7, 5), (2, 6, 16, 16)])
def test_global_avgpool(backend, shape):
    _, kn = backend
    rng = np.random.default_rng(sum(shape) + 1)
    x = rand(rng, *shape)
    same(kn.global_avgpool_forward(x), ref.global_avgpool_forward(x), atol=1e-7)
    g = rand(rng, *shape[:2])
    same(kn.global_avgpool_backward(g, shape), ref.global_avgpool_backward(g, shape), atol=1e-8)


def test_conv_kernels_leave_inputs_alone(backend):
    _, kn = backend
    rng = np.random.default_rng(9)
    x, wt, b, g = rand(rng, 2, 2, 4, 4), rand(rng, 3, 2, 3, 3), rand(rng, 3), rand(rng, 2, 3, 4, 4)
    saved = [a.copy() for a in (x, wt, b, g)]
    kn.conv2d_forward(x, wt, b)
    kn.conv2d_backward(x, wt, g)
    kn.maxpool2_forward(x)
    kn.global_avgpool_forward(x)
    for before, now in zip(saved, (x, wt, b, g), strict=True):
        np.testing.assert_array_equal(before, now)


BAD = {
    "even k": lambda k: k.conv2d_forward(np.ones((1, 2, 4, 4), F32), np.ones((1, 2, 2, 2), F32),
                                         np.ones(1, F32)),
    "channels": lambda k: k.conv2d_forward(np.ones((1, 2, 4, 4), F32),
                                           np.ones((1, 3, 3, 3), F32), np.ones(1, F32)),
    "bias": lambda k: k.conv2d_forward(np.ones((1, 2, 4, 4), F32), np.ones((1, 2, 3, 3), F32),
                                       np.ones(2, F32)),
    "float64 mix": lambda k: k.conv2d_forward(np.ones((1, 2, 4, 4)), np.ones((1, 2, 3, 3), F32),
                                              np.ones(1, F32)),
    "dy shape": lambda k: k.conv2d_backward(np.ones((1, 2, 4, 4), F32),
                                            np.ones((1, 2, 3, 3), F32),
                                            np.ones((1, 1, 4, 3), F32)),
    "odd pool": lambda k: k.maxpool2_forward(np.ones((1, 1, 3, 4), F32)),
    "argmax range": lambda k: k.maxpool2_backward(np.ones((1, 1, 1, 1), F32),
                                                  np.full((1, 1, 1, 1), 4, np.int8),
                                                  (1, 1, 2, 2)),
    "argmax dtype": lambda k: k.maxpool2_backward(np.ones((1, 1, 1, 1), F32),
                                                  np.zeros((1, 1, 1, 1), np.int64),
                                                  (1, 1, 2, 2)),
    "x_shape": lambda k: k.maxpool2_backward(np.ones((1, 1, 1, 1), F32),
                                             np.zeros((1, 1, 1, 1), np.int8), (1, 1, 4, 2)),
    "avg dy": lambda k: k.global_avgpool_backward(np.ones((2, 3), F32), (2, 2, 4, 4)),
    "avg 3-D": lambda k: k.global_avgpool_forward(np.ones((2, 3, 4), F32)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_conv_kernels_reject(backend, case):
    _, kn = backend
    with pytest.raises((TypeError, ValueError)):
        BAD[case](kn)
    with pytest.raises((TypeError, ValueError)):
        BAD[case](ref)

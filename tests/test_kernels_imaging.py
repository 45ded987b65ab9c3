"""Imaging preprocessing kernels (HU rescale + window + resample) on every backend vs the oracle.

The oracle itself is checked against cases with a closed form: 2x down-sampling with pixel-centre
mapping averages 2x2 blocks, out == in is the identity, a constant image stays constant.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import reference as ref

F32 = np.float32
DTYPES = [np.int16, np.uint16, np.int32, np.float32]


def stored(rng, dtype, rows, cols):
    """Seeded stored values of `dtype` spanning a range wide enough to be windowed both ways."""
    if dtype == np.uint16:
        a = rng.integers(1, 2000, (rows, cols))
    elif dtype == np.int32:
        a = rng.integers(-40000, 40000, (rows, cols))
    elif dtype == np.int16:
        a = rng.integers(-1000, 1000, (rows, cols))
    else:
        a = rng.uniform(-1000, 1000, (rows, cols))
    a[a == 0] = 7
    return np.ascontiguousarray(a.astype(dtype))


# slope, intercept, center, width per dtype: chosen so the window clips some pixels at both ends
RESCALE = {np.int16: (1.0, -24.0, 40.0, 800.0), np.uint16: (1.0, -1024.0, 40.0, 1500.0),
           np.int32: (0.05, 3.0, 100.0, 2500.0), np.float32: (1.5, -2.0, -100.0, 1700.0)}


def windowed(p, slope, intercept, center, width):
    """The textbook formula on float64, for exact-identity comparisons."""
    hu = p.astype(np.float64) * slope + intercept
    return np.clip((hu - (center - width / 2)) / width, 0, 1).astype(F32)


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_identity_size_is_windowed_input(dtype):
    p = stored(np.random.default_rng(1), dtype, 13, 9)
    args = RESCALE[dtype]
    out = ref.preprocess_slice(p, *args, 13, 9)
    np.testing.assert_array_equal(out, windowed(p, *args))
    assert (out == 0).any() and (out == 1).any() and ((out > 0) & (out < 1)).any()


def test_reference_half_size_averages_blocks():
    rng = np.random.default_rng(2)
    p = rng.integers(-100, 100, (8, 12)).astype(np.int16)
    out = ref.preprocess_slice(p, 1.0, 0.0, 0.0, 1000.0, 4, 6)  # window never clips here
    blocks = p.astype(np.float64).reshape(4, 2, 6, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out, (blocks + 500) / 1000, rtol=1e-6)


def test_reference_double_size_of_a_row():
    """Up-sampling 1 x 3 -> 1 x 6: src = d/2 - 0.25, clamped; rows stay put (one input row)."""
    p = np.array([[0.0, 400.0, 200.0]], dtype=F32)
    out = ref.preprocess_slice(p, 1.0, 0.0, 500.0, 1000.0, 2, 6)
    want = np.array([0.0, 100.0, 300.0, 350.0, 250.0, 200.0]) / 1000
    np.testing.assert_allclose(out, np.vstack([want, want]), rtol=1e-6, atol=1e-7)


def test_reference_constant_image_stays_constant():
    p = np.full((5, 7), 300, np.uint16)
    out = ref.preprocess_slice(p, 2.0, -100.0, 400.0, 800.0, 11, 3)
    np.testing.assert_allclose(out, np.full((11, 3), 0.625), rtol=1e-7)  # (600 - 100 - 0) / 800


def test_reference_resample_depth_closed_form():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((3, 4, 5)).astype(F32)
    out = ref.resample_depth(s, np.array([0.0, 1.0, 3.0]), 4)  # targets 0, 1, 2, 3
    want = np.stack([s[0], s[1], (s[1].astype(np.float64) + s[2]) / 2, s[2]])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- backends vs oracle


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_in,shape_out", [((16, 16), (16, 16)), ((37, 23), (8, 11)),
                                                ((9, 6), (31, 17)), ((1, 1), (3, 2))],
                         ids=["identity", "down", "up", "single-pixel"])
def test_preprocess_slice(backend, dtype, shape_in, shape_out):
    _, k = backend
    rng = np.random.default_rng(shape_in[0] * 97 + shape_out[1])
    p = stored(rng, dtype, *shape_in)
    args = RESCALE[dtype]
    got = k.preprocess_slice(p, *args, *shape_out)
    want = ref.preprocess_slice(p, *args, *shape_out)
    assert got.dtype == F32 and got.shape == shape_out and got.flags.c_contiguous
    assert want.flags.c_contiguous  # the oracle keeps the layout contract too
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if shape_in == shape_out:
        np.testing.assert_array_equal(got, windowed(p, *args))


def test_preprocess_slice_window_edges(backend):
    _, k = backend
    # HU = stored - 1000; window [0, 100]: below, low edge, centre, high edge, above
    p = np.array([[900, 1000, 1050, 1100, 1200, 1025]], dtype=np.int16)
    out = k.preprocess_slice(p, 1.0, -1000.0, 50.0, 100.0, 1, 6)
    np.testing.assert_array_equal(out, np.array([[0, 0, 0.5, 1, 1, 0.25]], F32))


def test_preprocess_slice_leaves_input_alone(backend):
    _, k = backend
    p = stored(np.random.default_rng(4), np.int16, 10, 10)
    saved = p.copy()
    k.preprocess_slice(p, 1.0, -1024.0, 40.0, 400.0, 5, 20)
    np.testing.assert_array_equal(p, saved)


@pytest.mark.parametrize("dtype", [">i2", ">u2", ">i4", ">f4"])
def test_preprocess_slice_takes_big_endian_pixels(backend, dtype):
    _, k = backend
    p = stored(np.random.default_rng(5), np.dtype(dtype).newbyteorder("="), 12, 9)
    big = p.astype(dtype)
    np.testing.assert_array_equal(k.preprocess_slice(big, 1.0, -1024.0, 40.0, 400.0, 6, 5),
                                  ref.preprocess_slice(p, 1.0, -1024.0, 40.0, 400.0, 6, 5))


@pytest.mark.parametrize("case", ["float64", "uint8", "3-D", "empty", "strided", "width 0",
                                  "nan slope", "rows 0", "cols float", "nan pixel"])
def test_preprocess_slice_rejects(backend, case):
    _, k = backend
    p = np.ones((4, 4), np.int16)
    args = [p, 1.0, 0.0, 40.0, 80.0, 4, 4]
    if case == "float64":
        args[0] = p.astype(np.float64)
    elif case == "uint8":
        args[0] = p.astype(np.uint8)
    elif case == "3-D":
        args[0] = np.ones((2, 4, 4), np.int16)
    elif case == "empty":
        args[0] = np.ones((0, 4), np.int16)
    elif case == "strided":
        args[0] = np.ones((4, 8), np.int16)[:, ::2]
    elif case == "width 0":
        args[4] = 0.0
    elif case == "nan slope":
        args[1] = float("nan")
    elif case == "rows 0":
        args[5] = 0
    elif case == "cols float":
        args[6] = 4.0
    else:
        args[0] = np.array([[1.0, np.nan], [0.0, 2.0]], F32)
    with pytest.raises((TypeError, ValueError)):
        k.preprocess_slice(*args)


@pytest.mark.parametrize("positions,depth", [([0.0, 1.5, 2.0, 5.0], 9), ([-3.0, -1.0, 4.0, 4.5,
                                                                         6.0, 9.0, 9.5], 3),
                                             ([0.0, 2.5, 5.0], 3), ([12.0], 4), ([1.0, 2.0], 1)],
                         ids=["up", "down", "same", "one-slice", "depth-1"])
def test_resample_depth(backend, positions, depth):
    _, k = backend
    rng = np.random.default_rng(len(positions) * 10 + depth)
    s = rng.uniform(0.01, 1.0, (len(positions), 6, 5)).astype(F32)
    pos = np.array(positions)
    got = k.resample_depth(s, pos, depth)
    want = ref.resample_depth(s, pos, depth)
    assert got.dtype == F32 and got.shape == (depth, 6, 5)
    assert got.flags.c_contiguous and want.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[0], s[0])  # the first target is the first slice exactly
    if depth > 1:
        np.testing.assert_array_equal(got[-1], s[-1])
    if len(positions) == 1:
        assert all(np.array_equal(plane, s[0]) for plane in got)
    if positions == [0.0, 2.5, 5.0]:  # evenly spaced and depth == k: the identity
        np.testing.assert_array_equal(got, s)


@pytest.mark.parametrize("case", ["not increasing", "repeated", "float32 positions", "nan",
                                  "short positions", "float64 stack", "depth 0", "2-D stack"])
def test_resample_depth_rejects(backend, case):
    _, k = backend
    s = np.ones((3, 2, 2), F32)
    pos = np.array([0.0, 1.0, 2.0])
    depth = 4
    if case == "not increasing":
        pos = np.array([0.0, 2.0, 1.0])
    elif case == "repeated":
        pos = np.array([0.0, 1.0, 1.0])
    elif case == "float32 positions":
        pos = pos.astype(F32)
    elif case == "nan":
        pos = np.array([0.0, np.nan, 2.0])
    elif case == "short positions":
        pos = pos[:2]
    elif case == "float64 stack":
        s = s.astype(np.float64)
    elif case == "depth 0":
        depth = 0
    else:
        s = np.ones((3, 4), F32)
    with pytest.raises((TypeError, ValueError)):
        k.resample_depth(s, pos, depth)

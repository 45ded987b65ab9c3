"""Update codec kernels: the oracle's properties, and every backend equal to the oracle.

Properties (on the numpy reference): stochastic rounding is unbiased within a statistical
bound, a round trip stays within one quantization step, zero-length, all-zero and all-equal
vectors, top-k picks the largest magnitudes with a fixed tie rule, and error feedback conserves
what was not sent. Then the fast backends must give the same codes, scales, indices and
accumulators on seeded random inputs (bit for bit: both compute in float32 in one order).
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import ref_codec
from kernels import reference as ref

F32 = np.float32


def vec(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(n) * scale).astype(F32)


# ---------------------------------------------------------------------------- the oracle


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(0)
    x = vec(rng, 1000, 0.01)
    runs = 400
    total = np.zeros(x.size)
    for seed in range(runs):
        q, s = ref.quantize_int8(x, 64, seed)
        total += ref.dequantize_int8(q, s, 64)
    mean = total / runs
    step = np.repeat(ref_codec.block_scales(x, 64), 64)[:x.size].astype(np.float64)
    # Each draw errs by less than one step with variance <= step^2 / 4: the mean of `runs`
    # draws is within 5 standard errors everywhere, and the overall bias is far smaller.
    assert np.all(np.abs(mean - x) <= 5 * step / (2 * np.sqrt(runs)) + 1e-12)
    assert abs(np.mean((mean - x) / step)) < 0.01
    # Deterministic rounding would be biased on this input; stochastic is not.
    nearest = np.round(x / step) * step
    assert np.abs(np.mean(mean - x)) < np.abs(np.mean(nearest - x)) + 1e-9


def test_round_trip_is_within_one_step_and_codes_are_int8():
    rng = np.random.default_rng(1)
    for n, block in [(1, 1), (5, 4), (1000, 256), (4097, 64)]:
        x = vec(rng, n, 3.0)
        q, s = ref.quantize_int8(x, block, seed=7)
        assert q.dtype == np.int8 and s.dtype == F32 and s.size == -(-n // block)
        assert q.min() >= -127 and q.max() <= 127
        step = np.repeat(s, block)[:n]
        assert np.all(np.abs(ref.dequantize_int8(q, s, block) - x) <= step * 1.0001)


def test_zero_length_all_zero_and_all_equal_vectors():
    q, s = ref.quantize_int8(np.zeros(0, F32), 256, 0)
    assert q.size == 0 and s.size == 0
    assert ref.dequantize_int8(q, s, 256).size == 0
    q, s = ref.quantize_int8(np.zeros(300, F32), 256, 0)
    assert not q.any() and not s.any()
    x = np.full(300, F32(-0.5))
    q, s = ref.quantize_int8(x, 256, 3)
    assert np.all(q == -127) and np.allclose(ref.dequantize_int8(q, s, 256), x)


def test_pieces_quantize_like_the_whole():
    x = vec(np.random.default_rng(2), 1024)
    q, s = ref.quantize_int8(x, 128, seed=11)
    q1, s1 = ref.quantize_int8(x[:512], 128, seed=11)
    q2, s2 = ref.quantize_int8(x[512:], 128, seed=11, offset=512)
    assert np.array_equal(q, np.concatenate([q1, q2]))
    assert np.array_equal(s, np.concatenate([s1, s2]))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        ref.quantize_int8(np.array([1.0, np.nan], F32), 2, 0)
    with pytest.raises(TypeError, match="float32"):
        ref.quantize_int8(np.zeros(3), 2, 0)
    with pytest.raises(ValueError, match="block"):
        ref.quantize_int8(np.zeros(3, F32), 0, 0)
    with pytest.raises(ValueError, match="scales"):
        ref.dequantize_int8(np.zeros(5, np.int8), np.zeros(1, F32), 4)
    with pytest.raises(ValueError, match="k must be"):
        ref.topk_indices(np.zeros(3, F32), 4)
    with pytest.raises(ValueError, match="ascending"):
        ref.scatter_dequantize_accumulate(np.zeros(4, F32), np.array([2, 1]),
                                          np.ones(2, np.int8), np.ones(1, F32), 2, 1.0)


def test_topk_takes_the_largest_magnitudes_lowest_index_on_ties():
    v = np.array([0.5, -3.0, 2.0, -2.0, 2.0, 0.0], F32)
    assert ref.topk_indices(v, 2).tolist() == [1, 2]  # |2.0| ties at 2, 3, 4: index 2 first
    assert ref.topk_indices(v, 4).tolist() == [1, 2, 3, 4]
    assert ref.topk_indices(v, 0).size == 0
    assert ref.topk_indices(v, 6).tolist() == list(range(6))


def test_error_feedback_conserves_what_was_not_sent():
    """Over rounds, everything sent plus the residual left equals every update produced."""
    rng = np.random.default_rng(4)
    n, k, block = 2000, 100, 32
    residual = np.zeros(n, F32)
    sent_total = np.zeros(n, np.float64)
    produced = np.zeros(n, np.float64)
    for r in range(20):
        delta = vec(rng, n, 0.1)
        produced += delta
        v = delta + residual
        idx = ref.topk_indices(v, k)
        q, s = ref.quantize_int8(np.ascontiguousarray(v[idx]), block, seed=r)
        sent = np.zeros(n, F32)
        ref.scatter_dequantize_accumulate(sent, idx, q, s, block, 1.0)
        residual = v - sent
        sent_total += sent
    np.testing.assert_allclose(sent_total + residual, produced, atol=2e-5)
    assert np.abs(residual).max() < np.abs(produced).max()  # large values do get sent


# ---------------------------------------------------------------------------- backends


@pytest.mark.parametrize("n,block", [(0, 256), (1, 1), (1000, 7), (70000, 256), (65536, 4096)])
def test_quantize_matches_reference(backend, n, block):
    _, k = backend
    x = vec(np.random.default_rng(n + block), n, 0.05)
    if n > 10:
        x[3:40] = 0.0  # a zero block for small blocks
    for seed, offset in [(0, 0), (12345, 999)]:
        q, s = k.quantize_int8(x, block, seed, offset)
        rq, rs = ref.quantize_int8(x, block, seed, offset)
        assert np.array_equal(s, rs) and np.array_equal(q, rq)
        assert np.array_equal(k.dequantize_int8(q, s, block), ref.dequantize_int8(q, s, block))


@pytest.mark.parametrize("n,block", [(1, 1), (1000, 7), (70000, 256)])
def test_dequantize_accumulate_matches_reference(backend, n, block):
    _, k = backend
    rng = np.random.default_rng(n)
    q, s = ref.quantize_int8(vec(rng, n), block, 5)
    acc = vec(rng, n)
    racc = acc.copy()
    for w in (0.25, 3.0):
        k.dequantize_accumulate(acc, q, s, block, w)
        ref.dequantize_accumulate(racc, q, s, block, w)
    np.testing.assert_array_equal(acc, racc)


@pytest.mark.parametrize("n,kk", [(1, 1), (50, 0), (1000, 10), (70000, 700), (9, 9)])
def test_topk_and_scatter_match_reference(backend, n, kk):
    _, k = backend
    rng = np.random.default_rng(kk)
    v = np.round(vec(rng, n), 1)  # rounding makes ties at the threshold likely
    idx = k.topk_indices(v, kk)
    assert np.array_equal(idx, ref.topk_indices(v, kk))
    q, s = ref.quantize_int8(np.ascontiguousarray(v[idx]), 16, 1)
    acc = vec(rng, n)
    racc = acc.copy()
    k.scatter_dequantize_accumulate(acc, idx, q, s, 16, 0.5)
    ref.scatter_dequantize_accumulate(racc, idx, q, s, 16, 0.5)
    np.testing.assert_array_equal(acc, racc)


def test_backends_refuse_what_the_reference_refuses(backend):
    _, k = backend
    with pytest.raises(ValueError, match="NaN"):
        k.quantize_int8(np.array([1.0, np.inf], F32), 2, 0)
    with pytest.raises(ValueError, match="NaN"):
        k.topk_indices(np.array([1.0, np.nan], F32), 1)
    with pytest.raises(ValueError, match="shape"):
        k.dequantize_accumulate(np.zeros(3, F32), np.zeros(4, np.int8), np.ones(1, F32), 4, 1.0)


@pytest.mark.parametrize("n,block,sites", [(1, 1, 1), (1000, 7, 3), (70000, 256, 10),
                                           (300, 256, 0)])
def test_many_sites_in_one_pass_equal_one_call_per_site(backend, n, block, sites):
    _, k = backend
    rng = np.random.default_rng(n + sites)
    pairs = [ref.quantize_int8(vec(rng, n), block, s) for s in range(sites)]
    q = np.stack([p[0] for p in pairs]) if sites else np.zeros((0, n), np.int8)
    scales = np.stack([p[1] for p in pairs]) if sites else np.zeros(
        (0, ref_codec.n_blocks(n, block)), F32)
    weights = rng.uniform(1, 300, sites).astype(F32)
    acc = vec(rng, n)
    one_by_one = acc.copy()
    for s in range(sites):
        ref.dequantize_accumulate(one_by_one, q[s], scales[s], block, float(weights[s]))
    k.dequantize_accumulate_many(acc, q, scales, block, weights)
    np.testing.assert_array_equal(acc, one_by_one)
    with pytest.raises(ValueError, match="shape"):
        k.dequantize_accumulate_many(acc, q, scales, block, np.append(weights, F32(1)))

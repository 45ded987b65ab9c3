"""The update codec's wire format: round trips, sizes, error feedback, and forged bodies."""

from __future__ import annotations

import io
import resource

import numpy as np
import pytest
import zstandard

import kernels
from agent.config import CompressionSpec
from agent.errors import ProtocolError
from agent.federation.aggregate import FedAvgAccumulator, fedavg
from agent.federation.codec import accumulate_update, encode_update, packed_size

K = kernels.get_backend("reference")
F32 = np.float32
SPECS = [CompressionSpec(), CompressionSpec(quantize="int8"),
         CompressionSpec(topk_fraction=0.1), CompressionSpec(quantize="int8", topk_fraction=0.05)]


def delta(n: int = 5000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.01).astype(F32)


def decoded(enc, spec, n) -> np.ndarray:
    acc = np.zeros(n, F32)
    accumulate_update(acc, 1.0, enc.body, enc.meta, spec, K)
    return acc


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "top10", "int8-top5"])
def test_round_trip_and_size(spec):
    d = delta()
    enc = encode_update(d, spec, seed=3, kernels=K, residual=np.zeros_like(d))
    got = decoded(enc, spec, d.size)
    k = enc.meta["k"]
    assert k == (d.size if spec.topk_fraction == 1 else int(np.ceil(spec.topk_fraction * d.size)))
    if spec.quantize == "none" and k == d.size:
        assert np.array_equal(got, d)
    # What arrived plus what the site keeps is what it had to send.
    kept = enc.residual if enc.residual is not None else np.zeros_like(d)
    if spec.quantize == "int8" and k == d.size:
        step = np.abs(d).max() / 127
        assert np.abs(got - d).max() <= step * 1.0001
    else:
        np.testing.assert_allclose(got + kept, d, atol=1e-7)
    raw = d.size * 4
    assert len(enc.body) < raw * (1.0 if spec.quantize == "none" and k == d.size else 0.3)


def test_int8_with_top5_is_16x_smaller_than_float32():
    d = delta(200_000)
    enc = encode_update(d, SPECS[3], seed=1, kernels=K, residual=np.zeros_like(d))
    assert d.size * 4 / len(enc.body) >= 16
    enc = encode_update(d, SPECS[1], seed=1, kernels=K)
    assert d.size * 4 / len(enc.body) >= 3.9


def test_error_feedback_carries_the_residual_into_the_next_update():
    spec = SPECS[3]
    residual = np.zeros(5000, F32)
    total_sent = np.zeros(5000, np.float64)
    total = np.zeros(5000, np.float64)
    for r in range(30):
        d = delta(seed=r)
        total += d
        enc = encode_update(d, spec, seed=r, kernels=K, residual=residual)
        total_sent += decoded(enc, spec, d.size)
        residual = enc.residual
    np.testing.assert_allclose(total_sent + residual, total, atol=1e-5)


def _forged(enc, **meta):
    return enc.body, enc.meta | meta


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "top10", "int8-top5"])
def test_forged_bodies_are_refused_before_touching_the_sum(spec):
    d = delta()
    enc = encode_update(d, spec, seed=3, kernels=K, residual=np.zeros_like(d))
    n = d.size
    expected = packed_size(n, enc.meta["k"], spec.quantize, spec.block)
    cases = [
        (enc.body, enc.meta | {"n": n + 1}),  # another model size
        (enc.body, enc.meta | {"k": enc.meta["k"] - 1}),  # not the plan's k
        (enc.body, enc.meta | {"quantize": "int8" if spec.quantize == "none" else "none"}),
        (enc.body, enc.meta | {"codec": 2}),
        (enc.body[:-3], enc.meta),  # cut short
        (b"garbage" * 10, enc.meta),
        (zstandard.ZstdCompressor().compress(b"\0" * (expected + 1)), enc.meta),  # too big
        (zstandard.ZstdCompressor().compress(b"\0" * (expected - 1)), enc.meta),  # too small
    ]
    if spec.quantize == "int8":  # a NaN scale
        packed = bytearray(zstandard.ZstdDecompressor().decompress(enc.body))
        at = 4 * enc.meta["k"] if enc.meta["k"] < n else 0
        packed[at:at + 4] = np.array([np.nan], "<f4").tobytes()
        cases.append((zstandard.ZstdCompressor().compress(bytes(packed)), enc.meta))
    if enc.meta["k"] < n:  # an index beyond the model
        packed = bytearray(zstandard.ZstdDecompressor().decompress(enc.body))
        packed[0:4] = np.array([n + 5], "<u4").tobytes()
        cases.append((zstandard.ZstdCompressor().compress(bytes(packed)), enc.meta))
    for body, meta in cases:
        acc = np.ones(n, F32)
        with pytest.raises(ProtocolError):
            accumulate_update(acc, 1.0, body, meta, spec, K)
        assert np.all(acc == 1.0)


def _bomb(declared: bool, size: int = 256 << 20) -> bytes:
    """A tiny zstd frame of `size` zero bytes, made in 1 MiB pieces (never held whole)."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=19)
    with cctx.stream_writer(out, size=size if declared else -1, closefd=False) as writer:
        zeros = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(zeros)
    return out.getvalue()


@pytest.mark.parametrize("declared", [True, False])
def test_a_decompression_bomb_is_not_inflated(declared):
    spec = SPECS[1]
    enc = encode_update(delta(), spec, seed=0, kernels=K)
    bomb = _bomb(declared)
    assert len(bomb) < 64 << 10
    assert zstandard.frame_content_size(bomb) == (256 << 20 if declared else -1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(ProtocolError, match="bad_update_size"):
        accumulate_update(np.zeros(5000, F32), 1.0, bomb, enc.meta, spec, K)
    # Refused without inflating it: 256 MiB would raise the peak far above what it was.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10


@pytest.mark.parametrize("spec", SPECS[:2], ids=["f32", "int8"])
def test_streamed_fedavg_matches_the_float64_oracle(spec):
    """Three encoded updates folded into the accumulator as they come give the FedAvg of
    what was sent (float64 oracle); float32 updates exactly what was produced."""
    params = delta(4000, seed=9)
    updates = [delta(4000, seed=s) for s in range(3)]
    weights = [120.0, 40.0, 300.0]
    acc = FedAvgAccumulator(params.size, K)
    sent = []
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        enc = encode_update(u, spec, seed=i, kernels=K)
        acc.add_encoded(enc.body, enc.meta, w, spec)
        sent.append(decoded(enc, spec, u.size))
    want = fedavg(params, sent, weights)
    np.testing.assert_allclose(acc.apply(params), want, rtol=1e-5, atol=1e-7)
    if spec.quantize == "none":
        np.testing.assert_allclose(acc.apply(params), fedavg(params, updates, weights),
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weight"):
        acc.add_encoded(enc.body, enc.meta, 0.0, spec)

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
from agent.federation.aggregate import FedAvgAccumulator, WeightedSum, accumulate_update, fedavg
from agent.federation.codec import (
    UpdateStream,
    encode_update,
    max_body_len,
    packed_size,
)

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


def frames_of(body: bytes) -> list[bytes]:
    """The zstd frames of a body (each is a uint32 length, then the frame)."""
    out, pos = [], 0
    while pos < len(body):
        length = int.from_bytes(body[pos:pos + 4], "little")
        out.append(body[pos + 4:pos + 4 + length])
        pos += 4 + length
    return out


def body_of(frames: list[bytes]) -> bytes:
    return b"".join(len(f).to_bytes(4, "little") + f for f in frames)


def packed_frames(enc) -> list[bytearray]:
    return [bytearray(zstandard.ZstdDecompressor().decompress(f)) for f in frames_of(enc.body)]


def repacked(packed: list[bytearray]) -> bytes:
    return body_of([zstandard.ZstdCompressor().compress(bytes(p)) for p in packed])


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "top10", "int8-top5"])
def test_forged_bodies_are_refused_before_touching_the_sum(spec):
    d = delta()  # one frame: a refusal anywhere leaves the sum untouched
    enc = encode_update(d, spec, seed=3, kernels=K, residual=np.zeros_like(d))
    n, k = d.size, enc.meta["k"]
    expected = packed_size(k, k < n, spec.quantize, spec.block)
    z = zstandard.ZstdCompressor()
    cases = [
        (enc.body, enc.meta | {"n": n + 1}),  # another model size
        (enc.body, enc.meta | {"k": k - 1}),  # not the plan's k
        (enc.body, enc.meta | {"quantize": "int8" if spec.quantize == "none" else "none"}),
        (enc.body, enc.meta | {"codec": 1}),
        (enc.body, enc.meta | {"frame": 1000}),
        (enc.body[:-3], enc.meta),  # cut short
        (enc.body + b"\0\0\0\0", enc.meta),  # bytes after the last frame
        (b"garbage" * 10, enc.meta),
        (body_of([b"\x28\xb5\x2f\xfd" + b"\0" * 40]), enc.meta),  # a broken zstd frame
        (body_of([z.compress(b"\0" * (expected + 1))]), enc.meta),  # too big
        (body_of([z.compress(b"\0" * (expected - 1))]), enc.meta),  # too small
    ]
    if spec.quantize == "int8":  # a NaN scale
        packed = packed_frames(enc)
        at = 4 * k if k < n else 0
        packed[0][at:at + 4] = np.array([np.nan], "<f4").tobytes()
        cases.append((repacked(packed), enc.meta))
    if k < n:  # an index beyond the model, then one repeated
        packed = packed_frames(enc)
        packed[0][0:4] = np.array([n + 5], "<u4").tobytes()
        cases.append((repacked(packed), enc.meta))
        packed = packed_frames(enc)
        packed[0][4:8] = np.array([0], "<u4").tobytes()
        cases.append((repacked(packed), enc.meta))
    for body, meta in cases:
        acc = np.ones(n, F32)
        with pytest.raises(ProtocolError):
            accumulate_update(acc, 1.0, body, meta, spec, K)
        assert np.all(acc == 1.0)


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "top10", "int8-top5"])
def test_a_body_fed_in_any_pieces_decodes_like_the_whole(spec):
    d = delta(300_000 if spec.topk_fraction == 1 else 1_500_000, seed=5)  # >= 2 frames
    enc = encode_update(d, spec, seed=4, kernels=K, residual=np.zeros_like(d))
    whole = decoded(enc, spec, d.size)
    rng = np.random.default_rng(0)
    for _ in range(3):
        acc = np.zeros(d.size, F32)
        stream = UpdateStream(WeightedSum(acc, 1.0, K), enc.meta, spec)
        cuts = np.sort(rng.integers(0, len(enc.body), 40))
        for a, b in zip([0, *cuts], [*cuts, len(enc.body)], strict=True):
            stream.feed(enc.body[a:b])
            assert stream.watermark <= d.size and (stream.watermark == d.size) == stream.complete
        stream.finish()
        assert np.array_equal(acc, whole)


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "top10", "int8-top5"])
def test_an_update_cut_off_adds_whole_frames_up_to_its_watermark(spec):
    d = delta(300_000 if spec.topk_fraction == 1 else 1_500_000, seed=6)  # >= 2 frames
    enc = encode_update(d, spec, seed=4, kernels=K, residual=np.zeros_like(d))
    whole = decoded(enc, spec, d.size)
    frames = frames_of(enc.body)
    assert len(frames) >= 2
    cut = len(body_of(frames[:-1])) + 10  # into the last frame
    acc = np.zeros(d.size, F32)
    stream = UpdateStream(WeightedSum(acc, 1.0, K), enc.meta, spec)
    stream.feed(enc.body[:cut])
    with pytest.raises(ProtocolError, match="bad_update_size"):
        stream.finish()
    w = stream.watermark
    assert 0 < w < d.size
    assert np.array_equal(acc[:w], whole[:w])  # everything below the watermark arrived
    assert whole[w:].any() and not acc[w:].any()  # nothing of the cut frame was added
    with pytest.raises(ProtocolError):
        stream.feed(enc.body[cut:])  # a failed stream takes nothing more


def test_a_cut_off_update_counts_only_where_it_arrived():
    """FedAvg per parameter over the updates that reached it: the float64 oracle below the
    cut-off update's watermark with all three, above it with the two complete ones."""
    spec = SPECS[0]
    params = delta(200_000, seed=9)
    updates = [delta(200_000, seed=s) for s in range(3)]
    weights = [120.0, 40.0, 300.0]
    acc = FedAvgAccumulator(params.size, K)
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        enc = encode_update(u, spec, seed=i, kernels=K)
        stream = acc.open_update(enc.meta, w, spec, label=f"site-{i}")
        body = enc.body if i != 1 else enc.body[:len(body_of(frames_of(enc.body)[:2]))]
        stream.feed(body)
        if i != 1:
            stream.finish()
    cut = acc.streams[1][1].watermark
    assert cut == 2 * 65_536 and acc.partial() == {"site-1": cut / params.size}
    assert acc.count == 2 and acc.total_weight == 420.0
    got = acc.apply(params)
    np.testing.assert_allclose(got[:cut], fedavg(params[:cut], [u[:cut] for u in updates],
                                                 weights), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[cut:], fedavg(params[cut:], [updates[0][cut:],
                                                                updates[2][cut:]],
                                                 [weights[0], weights[2]]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ProtocolError, match="round_closed"):
        acc.streams[1][1].feed(enc.body)


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
    n = 65_536  # one frame of 66,560 packed bytes: room for a bomb under zstd's bound
    enc = encode_update(delta(n), spec, seed=0, kernels=K)
    bomb = _bomb(declared)
    assert len(bomb) < 64 << 10
    assert zstandard.frame_content_size(bomb) == (256 << 20 if declared else -1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(ProtocolError, match="bad_update_size"):
        accumulate_update(np.zeros(n, F32), 1.0, body_of([bomb]), enc.meta, spec, K)
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


class CountingKernels:
    """The reference kernels, counting how many sites each summing call covered."""

    def __init__(self) -> None:
        self.sites_per_call: list[int] = []

    def __getattr__(self, name):
        return getattr(K, name)

    def dequantize_accumulate(self, *args) -> None:
        self.sites_per_call.append(1)
        K.dequantize_accumulate(*args)

    def dequantize_accumulate_many(self, acc, q, *args) -> None:
        self.sites_per_call.append(q.shape[0])
        K.dequantize_accumulate_many(acc, q, *args)


@pytest.mark.parametrize("hold_bytes", [16 << 20, 100_000])
def test_updates_arriving_together_are_summed_in_one_pass_per_frame(hold_bytes, monkeypatch):
    """Three int8 uploads interleaved chunk by chunk: each frame is summed once for all three
    sites, equal bit for bit to adding the updates one after another; with a small hold budget
    a stalled upload makes the others' frames go in early, still equal."""
    spec = SPECS[1]
    n = 300_000  # 5 frames
    encs = [encode_update(delta(n, seed=s), spec, seed=s, kernels=K) for s in range(3)]
    weights = [120.0, 40.0, 300.0]
    one_by_one = FedAvgAccumulator(n, K)
    for enc, w in zip(encs, weights, strict=True):
        one_by_one.add_encoded(enc.body, enc.meta, w, spec)
    counting = CountingKernels()
    together = FedAvgAccumulator(n, counting)
    monkeypatch.setattr(together, "HOLD_BYTES", hold_bytes)
    streams = [together.open_update(e.meta, w, spec, body_len=len(e.body))
               for e, w in zip(encs, weights, strict=True)]
    stall = hold_bytes < 1 << 20  # the last site sends half, then the rest at the end
    step = 20_000
    longest = max(len(e.body) for e in encs)
    for pos in range(0, longest, step):
        for i, (stream, enc) in enumerate(zip(streams, encs, strict=True)):
            if stall and i == 2 and pos >= len(enc.body) // 2 // step * step:
                continue
            stream.feed(enc.body[pos:pos + step])
            assert together._held_bytes <= hold_bytes
    if stall:
        streams[2].feed(encs[2].body[len(encs[2].body) // 2 // step * step:])
    for stream in streams:
        stream.finish()
    params = delta(n, seed=9)
    np.testing.assert_array_equal(together.apply(params), one_by_one.apply(params))
    if stall:
        assert 1 in counting.sites_per_call
    else:
        assert counting.sites_per_call == [3] * 5


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "top10", "int8-top5"])
def test_the_receivers_size_limit_admits_any_honest_update(spec):
    """Random float32 does not compress: framing and zstd make the body a little larger than
    4 bytes a parameter, which the limit must allow (and not much more)."""
    for n in (1, 65_536, 200_001):
        d = np.random.default_rng(n).standard_normal(n).astype(F32)
        enc = encode_update(d, spec, seed=1, kernels=K, residual=np.zeros_like(d))
        limit = max_body_len(n, spec)
        assert len(enc.body) <= limit <= 4 * n * 1.02 + 4096

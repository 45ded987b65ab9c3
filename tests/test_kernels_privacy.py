"""Privacy kernels: secure-aggregation masks (ChaCha20 mask expansion) and DP-SGD clipping.

The oracle's ChaCha20 is checked against RFC 8439's block test vector and against the
`cryptography` package's ChaCha20 (an independent implementation, OpenSSL's); then every fast
backend must give the oracle's masks bit for bit (exact integers), masks must cancel as secure
aggregation needs, and one masked vector of a very non-uniform input must pass a chi-square
uniformity test that the unmasked input fails. The clipped sum is checked against an
independent float64 formula, the backends against the oracle to rtol 1e-6, and every clipped
row's norm against the bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

import kernels
from kernels import ref_privacy
from kernels import reference as ref

F32 = np.float32
U32 = np.uint32


def rand_keys(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.integers(0, 256, size=(k, 32), dtype=np.uint8)


def rand_signs(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.choice(np.array([1, -1], dtype=np.int32), size=k)


def openssl_words(key: bytes, start: int, count: int, nonce: bytes = bytes(12)) -> np.ndarray:
    """Keystream words start .. start+count-1 from `cryptography`: its 16-byte nonce is the
    4-byte little-endian block counter then the 12-byte nonce; encrypting zeros gives the
    keystream."""
    first = start // 16
    skip = start - 16 * first
    enc = Cipher(algorithms.ChaCha20(key, first.to_bytes(4, "little") + nonce),
                 mode=None).encryptor()
    raw = enc.update(bytes(4 * (skip + count)))
    return np.frombuffer(raw, dtype="<u4")[skip:].astype(U32)


# ---------------------------------------------------------------------------- ChaCha20 itself


def test_rfc8439_block_test_vector():
    """RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00,
    block counter 1."""
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a00000000")
    want = [0xe4e7f110, 0x15593bd1, 0x1fdd0f50, 0xc47120a3,
            0xc7f4d1c7, 0x0368c033, 0x9aaa2204, 0x4e6cd4c3,
            0x466482d2, 0x09aa9f07, 0x05d7c214, 0xa2028bd9,
            0xd19c12b5, 0xb94e16de, 0xe883d0cb, 0x4e3c50a2]
    got = ref_privacy.chacha20_block_words(key, nonce, 1)
    assert got.dtype == U32 and got.tolist() == want
    serialized = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
    assert got.astype("<u4").tobytes() == serialized
    # the same block through the keystream helper: word 16 is block 1's first word
    ks = ref_privacy.chacha20_keystream_words(key, 16, 16, nonce=nonce)
    assert ks.tolist() == want


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 1000, 4099])
@pytest.mark.parametrize("start", [0, 1, 15, 16, 17, 12345])
def test_keystream_is_cryptographys(count, start):
    rng = np.random.default_rng(count * 100003 + start)
    key = rand_keys(rng, 1)[0].tobytes()
    got = ref_privacy.chacha20_keystream_words(key, start, count)
    assert got.dtype == U32 and got.shape == (count,)
    np.testing.assert_array_equal(got, openssl_words(key, start, count))


def test_keystream_at_the_end_of_the_block_counter():
    key = bytes(range(1, 33))
    end = ref_privacy.MAX_WORDS
    np.testing.assert_array_equal(ref_privacy.chacha20_keystream_words(key, end - 40, 40),
                                  openssl_words(key, end - 40, 40))
    with pytest.raises(ValueError, match="32-bit block counter"):
        ref_privacy.chacha20_keystream_words(key, end - 40, 41)


def test_keystream_with_a_nonce_and_long_stream_is_cryptographys():
    rng = np.random.default_rng(7)
    key, nonce = rand_keys(rng, 1)[0].tobytes(), rng.bytes(12)
    # 70,000 blocks: more than one of the oracle's vectorised chunks
    count = 70_000 * 16 + 5
    np.testing.assert_array_equal(
        ref_privacy.chacha20_keystream_words(key, 3, count, nonce=nonce),
        openssl_words(key, 3, count, nonce))


@pytest.mark.parametrize("n,start", [(0, 0), (1, 0), (15, 0), (17, 3), (1000, 16), (1234, 77)])
def test_reference_mask_is_the_signed_keystream(n, start):
    rng = np.random.default_rng(n + start)
    keys = rand_keys(rng, 2)
    base = rng.integers(0, 2**32, size=n, dtype=U32)
    acc = base.copy()
    ref.mask_accumulate(acc, keys, np.array([1, -1], np.int32), start)
    want = (base + openssl_words(keys[0].tobytes(), start, n)
            - openssl_words(keys[1].tobytes(), start, n))
    np.testing.assert_array_equal(acc, want)


# ---------------------------------------------------------------------------- mask properties

MASK_CASES = [(0, 0, 3), (1, 0, 1), (1, 5, 2), (15, 1, 3), (16, 16, 2), (17, 15, 9),
              (1000, 0, 9), (1001, 33, 4), (4099, 2045, 3), (40_000, 123_457, 2),
              (10_000, 0, 0)]


def _mask_case(n, start, k, seed=0):
    rng = np.random.default_rng(seed * 7919 + n * 31 + start * 7 + k)
    return rng.integers(0, 2**32, size=n, dtype=U32), rand_keys(rng, k), rand_signs(rng, k)


@pytest.mark.parametrize("n,start,k", MASK_CASES)
def test_masks_match_reference_bit_for_bit(backend, n, start, k):
    _, kb = backend
    acc0, keys, signs = _mask_case(n, start, k)
    want, got = acc0.copy(), acc0.copy()
    ref.mask_accumulate(want, keys, signs, start)
    assert kb.mask_accumulate(got, keys, signs, start) is None
    assert got.dtype == U32
    np.testing.assert_array_equal(got, want)


def test_masks_of_a_long_slice_match_reference(backend):
    """Tens of thousands of blocks and many parallel chunks, an odd start, nine keys."""
    _, kb = backend
    acc0, keys, signs = _mask_case(1_000_003, 999_999, 9, seed=1)
    want, got = acc0.copy(), acc0.copy()
    ref.mask_accumulate(want, keys, signs, 999_999)
    kb.mask_accumulate(got, keys, signs, 999_999)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kb_name", ["reference", "fast"])
def test_opposite_signs_of_one_key_cancel(backend, kb_name):
    _, kb = backend
    kb = ref if kb_name == "reference" else kb
    acc0, keys, _ = _mask_case(5003, 11, 3, seed=2)
    acc = acc0.copy()
    twice = np.ascontiguousarray(np.concatenate([keys, keys]))
    kb.mask_accumulate(acc, twice, np.array([1, -1, 1, -1, 1, -1], np.int32), 11)
    np.testing.assert_array_equal(acc, acc0)
    kb.mask_accumulate(acc, keys[:1], np.array([1], np.int32), 11)
    assert np.mean(acc != acc0) > 0.99  # one mask changes (nearly) every word
    kb.mask_accumulate(acc, keys[:1], np.array([-1], np.int32), 11)
    np.testing.assert_array_equal(acc, acc0)


def _pairwise_masked(kb, xs, pair_keys, start):
    """Each site i adds +mask(i, j) for i < j and -mask(j, i) for j < i."""
    sites = len(xs)
    out = []
    for i in range(sites):
        keys, signs = [], []
        for j in range(sites):
            if j != i:
                keys.append(pair_keys[min(i, j), max(i, j)])
                signs.append(1 if i < j else -1)
        masked = xs[i].copy()
        kb.mask_accumulate(masked, np.ascontiguousarray(np.stack(keys)),
                           np.array(signs, np.int32), start)
        out.append(masked)
    return out


@pytest.mark.parametrize("sites", [2, 3, 5, 10])
def test_pairwise_masks_cancel_in_the_sum(backend, sites):
    _, kb = backend
    rng = np.random.default_rng(sites)
    n, start = 3001, 45
    xs = [rng.integers(0, 256, size=n, dtype=U32) for _ in range(sites)]  # quantized updates
    pair_keys = {(i, j): rand_keys(rng, 1)[0] for i in range(sites) for j in range(i + 1, sites)}
    for k in (ref, kb):
        masked = _pairwise_masked(k, xs, pair_keys, start)
        for x, m in zip(xs, masked, strict=True):
            assert np.mean(x != m) > 0.99  # no site's update is visible
        total = np.add.reduce(np.stack(masked), axis=0, dtype=U32)  # mod 2^32
        np.testing.assert_array_equal(total, np.add.reduce(np.stack(xs), axis=0, dtype=U32))


def test_slices_expand_like_the_whole_vector(backend):
    """A long vector masked in slices (any word offsets) equals it masked at once."""
    _, kb = backend
    acc0, keys, signs = _mask_case(20_011, 0, 4, seed=3)
    whole = acc0.copy()
    ref.mask_accumulate(whole, keys, signs)
    pieces = acc0.copy()
    cuts = [0, 1, 17, 32, 1000, 1001, 9999, 20_011]
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        view = pieces[lo:hi]
        kb.mask_accumulate(view, keys, signs, lo)
    np.testing.assert_array_equal(pieces, whole)


# ---------------------------------------------------------------------------- uniformity

ALPHA = 1e-6  # false-alarm rate of the whole uniformity check (4 tests, Bonferroni)


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df >= x): scipy's when installed, else the Wilson-Hilferty approximation
    (the cube root of chi2/df is nearly normal; within ~10 % down to 1e-12 at df = 255)."""
    try:
        from scipy import stats
    except ImportError:
        return wilson_hilferty_sf(x, df)
    return float(stats.chi2.sf(x, df))


def wilson_hilferty_sf(x: float, df: int) -> float:
    v = 2 / (9 * df)
    z = ((x / df) ** (1 / 3) - (1 - v)) / math.sqrt(v)
    return 0.5 * math.erfc(z / math.sqrt(2))


def uniformity_pvalues(words: np.ndarray) -> dict[str, float]:
    """Chi-square goodness of fit to uniform over 256 bins for the low and the high 16 bits:
    each half binned by its top byte (256 equal-width bins) and by its bottom byte."""
    out = {}
    for half, h in (("low16", words & 0xFFFF), ("high16", words >> 16)):
        for part, bins in (("top", h >> 8), ("bottom", h & 0xFF)):
            counts = np.bincount(bins.astype(np.int64), minlength=256)
            expected = words.size / 256
            stat = float(np.sum((counts - expected) ** 2) / expected)
            out[f"{half} {part} byte"] = chi2_sf(stat, 255)
    return out


def test_wilson_hilferty_is_close_to_the_exact_tail():
    stats = pytest.importorskip("scipy.stats")
    for x in (255, 300, 350, 385, 400, 450):
        exact = stats.chi2.sf(x, 255)
        assert wilson_hilferty_sf(x, 255) == pytest.approx(exact, rel=0.2)


def test_a_masked_vector_of_small_integers_looks_uniform():
    rng = np.random.default_rng(2024)
    x = rng.integers(0, 10, size=1_000_000, dtype=U32)  # very non-uniform: 0..9
    masked = x.copy()
    ref.mask_accumulate(masked, rand_keys(rng, 1), np.array([1], np.int32))
    alpha = ALPHA / 4
    plain, hidden = uniformity_pvalues(x), uniformity_pvalues(masked)
    assert all(p > alpha for p in hidden.values()), hidden
    assert all(p < alpha for p in plain.values()), plain  # the test has power


# ---------------------------------------------------------------------------- device arrays


def test_gpu_masks_update_device_arrays_in_place():
    reason = kernels.available_backends()["gpu"]
    if reason is not None:
        pytest.skip(reason)
    import cupy

    g = kernels.get_backend("gpu")
    acc0, keys, signs = _mask_case(3_000_017, 5, 9, seed=4)
    dev = cupy.asarray(acc0)
    g.mask_accumulate(dev, keys, signs, 5)
    want = acc0.copy()
    ref.mask_accumulate(want, keys, signs, 5)
    np.testing.assert_array_equal(dev.get(), want)
    rows = _rows(64, 100_003, seed=5)
    total, count = g.clip_rows_sum(cupy.asarray(rows), 1.0)
    assert isinstance(total, cupy.ndarray)
    rt, rc = ref.clip_rows_sum(rows, 1.0)
    assert count == rc
    np.testing.assert_allclose(total.get(), rt, rtol=1e-6)


# ---------------------------------------------------------------------------- clipping


def _rows(b: int, n: int, seed: int = 0, clip: float = 1.0) -> np.ndarray:
    """Seeded rows whose norms run from far below to far above clip, with some zero rows."""
    rng = np.random.default_rng(seed * 1000 + b * 7 + n)
    x = rng.standard_normal((b, n))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    targets = clip * 10.0 ** rng.uniform(-4, 4, size=b)
    x *= targets[:, None]
    x[rng.random(b) < 0.15] = 0.0
    return x.astype(F32)


def _independent(rows: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    x = rows.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    factor = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
    return (x * factor[:, None]).sum(axis=0), int(np.sum(norms > clip))


CLIP_SHAPES = [(0, 7), (3, 0), (1, 1), (1, 5), (33, 1001), (8, 70_001), (257, 300)]


@pytest.mark.parametrize("b,n", CLIP_SHAPES)
@pytest.mark.parametrize("clip", [1.0, 0.37])
def test_reference_clip_is_the_textbook_formula(b, n, clip):
    rows = _rows(b, n, clip=clip)
    got, count = ref.clip_rows_sum(rows, clip)
    want, want_count = _independent(rows, clip)
    assert got.dtype == F32 and got.shape == (n,) and isinstance(count, int)
    assert count == want_count
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("b,n", CLIP_SHAPES)
def test_clip_matches_reference(backend, b, n):
    _, kb = backend
    rows = _rows(b, n, seed=1)
    kept = rows.copy()
    got, count = kb.clip_rows_sum(rows, 1.0)
    want, want_count = ref.clip_rows_sum(rows, 1.0)
    assert got.dtype == F32 and got.shape == (n,) and isinstance(count, int)
    assert count == want_count
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    np.testing.assert_array_equal(rows, kept)  # rows are not scaled in place


@pytest.mark.parametrize("kb_name", ["reference", "fast"])
def test_each_clipped_row_is_within_the_bound(backend, kb_name):
    _, kb = backend
    kb = ref if kb_name == "reference" else kb
    clip = 0.5
    rows = _rows(40, 513, seed=2, clip=clip)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    assert (norms == 0).any() and (norms < clip / 100).any() and (norms > clip * 100).any()
    for r in range(rows.shape[0]):
        one, count = kb.clip_rows_sum(rows[r:r + 1], clip)
        norm = np.linalg.norm(one.astype(np.float64))
        assert count == int(norms[r] > clip)
        assert norm <= clip * (1 + 1e-6), (r, norms[r], norm)
        if norms[r] > clip:
            assert norm == pytest.approx(clip, rel=1e-6)
        else:
            np.testing.assert_array_equal(one, rows[r])  # unscaled, zero rows included


def test_cpu_clip_is_the_same_serial_or_parallel(monkeypatch):
    if kernels.available_backends()["cpu"] is not None:
        pytest.skip("no numba")
    cpu = kernels.get_backend("cpu")
    rows = _rows(31, 9000, seed=3)
    serial = cpu.clip_rows_sum(rows, 1.0)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WORK", 0)
    parallel = cpu.clip_rows_sum(rows, 1.0)
    np.testing.assert_array_equal(serial[0], parallel[0])
    assert serial[1] == parallel[1]


# ---------------------------------------------------------------------------- bad input


def _bad_calls(k):
    acc = np.zeros(10, U32)
    keys = np.zeros((2, 32), np.uint8)
    signs = np.array([1, -1], np.int32)
    ro = np.zeros(10, U32)
    ro.flags.writeable = False
    rows = np.ones((2, 3), F32)
    return [
        (lambda: k.mask_accumulate(np.zeros(10, np.int32), keys, signs), TypeError,
         "acc must be a 1-D uint32"),
        (lambda: k.mask_accumulate(np.zeros((2, 5), U32), keys, signs), TypeError,
         "acc must be a 1-D uint32"),
        (lambda: k.mask_accumulate(np.zeros(20, U32)[::2], keys, signs), ValueError,
         "C-contiguous"),
        (lambda: k.mask_accumulate(ro, keys, signs), ValueError, "read-only"),
        (lambda: k.mask_accumulate([0, 1], keys, signs), TypeError, "acc must be a"),
        (lambda: k.mask_accumulate(acc, np.zeros((2, 16), np.uint8), signs), TypeError,
         r"keys must be a uint8 array \[k, 32\]"),
        (lambda: k.mask_accumulate(acc, keys.astype(np.int8), signs), TypeError, "keys must"),
        (lambda: k.mask_accumulate(acc, keys, np.array([1, 1, 1], np.int32)), TypeError,
         r"signs must be an int32 array of shape \(2,\)"),
        (lambda: k.mask_accumulate(acc, keys, signs.astype(np.int64)), TypeError, "signs must"),
        (lambda: k.mask_accumulate(acc, keys, np.array([1, 0], np.int32)), ValueError,
         r"signs must be \+1 or -1"),
        (lambda: k.mask_accumulate(acc, keys, signs, -1), ValueError,
         "start must be an integer >= 0"),
        (lambda: k.mask_accumulate(acc, keys, signs, 1.0), ValueError, "start must be"),
        (lambda: k.mask_accumulate(acc, keys, signs, True), ValueError, "start must be"),
        (lambda: k.mask_accumulate(acc, keys, signs, ref_privacy.MAX_WORDS - 9), ValueError,
         "32-bit block counter"),
        (lambda: k.clip_rows_sum(rows, 0.0), ValueError, "clip must be a finite number > 0"),
        (lambda: k.clip_rows_sum(rows, -1), ValueError, "clip must be"),
        (lambda: k.clip_rows_sum(rows, float("inf")), ValueError, "clip must be"),
        (lambda: k.clip_rows_sum(rows, True), ValueError, "clip must be"),
        (lambda: k.clip_rows_sum(rows.astype(np.float64), 1.0), TypeError, "must be float32"),
        (lambda: k.clip_rows_sum(np.ones(3, F32), 1.0), ValueError, "rows must be 2-D"),
        (lambda: k.clip_rows_sum(np.ones((3, 2), F32).T, 1.0), ValueError, "C-contiguous"),
    ]


def test_backends_refuse_what_the_reference_refuses(backend):
    _, kb = backend
    for (call, exc, match), (ref_call, _, _) in zip(_bad_calls(kb), _bad_calls(ref),
                                                    strict=True):
        with pytest.raises(exc, match=match):
            ref_call()
        with pytest.raises(exc, match=match):
            call()


def test_the_last_words_of_the_counter_range_are_accepted(backend):
    _, kb = backend
    start = ref_privacy.MAX_WORDS - 21
    acc0, keys, signs = _mask_case(21, 0, 2, seed=6)
    want, got = acc0.copy(), acc0.copy()
    ref.mask_accumulate(want, keys, signs, start)
    kb.mask_accumulate(got, keys, signs, start)
    np.testing.assert_array_equal(got, want)
    expect = acc0.copy()
    for key, sign in zip(keys, signs, strict=True):
        ks = openssl_words(key.tobytes(), start, 21)
        expect = expect + ks if sign > 0 else expect - ks
    np.testing.assert_array_equal(want, expect)

"""Secure aggregation math (agent/privacy/secagg.py) and a site's masking rules (secsite.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kernels
from agent.errors import ProtocolError
from agent.privacy import secagg
from agent.privacy.secsite import SecureState
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier

K = kernels.get_backend("cpu")


def _sites(n: int, tmp_path):
    names = [f"site{i:02d}" for i in range(n)]
    keys = {s: secagg.site_key(tmp_path / s, "run1") for s in names}
    return names, keys


def _masked(names, keys, values, wire, rnd=4, epoch=7):
    """Every site's masked update (as bytes) and its self-mask seed."""
    out, seeds = {}, {}
    for s in names:
        pair = {p: secagg.pair_seed(keys[s], keys[p].public_key(), federation="fed",
                                    run="run1", rnd=rnd, epoch=epoch, a=s, b=p)
                for p in names if p != s}
        k, signs = secagg.mask_keys(s, names, pair)
        seeds[s] = secagg.self_seed()
        out[s] = secagg.mask(values[s], k, signs, seeds[s], wire, K)
    return out, seeds


@pytest.mark.parametrize("n_sites", [2, 3, 5, 10])
@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_the_masked_sum_equals_the_plain_sum_of_quantized_updates_exactly(tmp_path, n_sites,
                                                                          quantize):
    rng = np.random.default_rng(n_sites)
    names, keys = _sites(n_sites, tmp_path)
    n, bound, bits = 5003, 0.5, secagg.code_bits(quantize)
    weights = secagg.integer_weights({s: float(rng.integers(20, 400)) for s in names},
                                     secagg.code_bits(quantize))
    deltas = {s: rng.normal(0, 0.2, n).astype(np.float32) for s in names}
    fixed = {s: secagg.to_fixed(deltas[s], bound=bound, bits=bits, weight=weights[s],
                                rng=np.random.default_rng(1)) for s in names}
    wire = secagg.ring_bits(sum(weights.values()), bits)
    bodies, seeds = _masked(names, keys, {s: f.values for s, f in fixed.items()}, wire)
    total = secagg.MaskedSum(n, wire)
    for s in names:  # fed in uneven chunks: a value may straddle two
        stream, body, at = total.stream(), bodies[s], 0
        for size in rng.integers(1, 3000, 100):
            stream.feed(body[at:at + size])
            at += size
        stream.feed(body[at:])
        stream.finish()
    values = secagg.unmask(total.total, [seeds[s] for s in names], wire, K)
    plain = sum(f.values for f in fixed.values())
    np.testing.assert_array_equal(values, plain)
    # and the mean it gives is the weighted mean of the clipped updates, to rounding
    mean = secagg.from_fixed(values, bound=bound, bits=bits, total_weight=sum(weights.values()))
    want = sum(weights[s] * np.clip(deltas[s], -bound, bound) for s in names) \
        / sum(weights.values())
    step = bound / (2 ** (bits - 1) - 1)
    assert np.max(np.abs(mean - want)) <= step * 1.0001
    assert sum(f.clipped for f in fixed.values()) == sum(
        int(np.count_nonzero(np.abs(d) > bound)) for d in deltas.values())


def test_without_one_self_seed_or_one_member_the_sum_is_garbage(tmp_path):
    names, keys = _sites(3, tmp_path)
    values = {s: np.full(1000, 3, dtype=np.int64) for s in names}
    bodies, seeds = _masked(names, keys, values, 16)
    total = secagg.MaskedSum(1000, 16)
    for s in names[:2]:  # the third member's update never arrived
        stream = total.stream()
        stream.feed(bodies[s])
        stream.finish()
    opened = secagg.unmask(total.total, [seeds[s] for s in names[:2]], 16, K)
    assert np.count_nonzero(opened == 6) < 5  # the pairwise masks with the third remain


def _chi_square_p(counts: np.ndarray) -> float:
    """Upper tail of chi-square (Wilson-Hilferty normal approximation; df = bins - 1)."""
    expected = counts.sum() / counts.size
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.size - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("wire", [16, 32])
def test_a_single_masked_update_is_indistinguishable_from_uniform(tmp_path, wire):
    """Chi-square goodness of fit on every byte lane of one masked update of an all-zero (as
    far from uniform as it gets) update: false-alarm rate 1e-6 per lane, so the test fails
    spuriously about once in 10^5 runs of the suite; the same test on the input fails."""
    names, keys = _sites(3, tmp_path)
    n = 1 << 18
    zeros = np.zeros(n, dtype=np.int64)
    bodies, _ = _masked(names, keys, {s: zeros for s in names}, wire)
    lanes = np.frombuffer(bodies[names[0]], dtype=np.uint8).reshape(n, wire // 8)
    for lane in lanes.T:
        assert _chi_square_p(np.bincount(lane, minlength=256)) > 1e-6
    plain = np.frombuffer((zeros & 0xFFFF).astype("<u2").tobytes(), np.uint8)
    assert _chi_square_p(np.bincount(plain, minlength=256)) < 1e-6


def test_ring_bits_and_weights():
    assert secagg.ring_bits(258, 8) == 16 and secagg.ring_bits(259, 8) == 32
    assert secagg.ring_bits(1, 16) == 16 and secagg.ring_bits(2, 16) == 32
    with pytest.raises(ValueError):
        secagg.ring_bits(70_000, 16)
    # 3 sites of int8 codes: 86 levels keep the sum in 16 bits
    three = secagg.integer_weights({"a": 500.0, "b": 50.0, "c": 0.1}, 8)
    assert three == {"a": 86, "b": 9, "c": 1}
    assert secagg.ring_bits(sum(three.values()), 8) == 16
    # 16-bit codes never fit 16 bits: 255 levels and a 32-bit ring
    assert secagg.integer_weights({"a": 500.0, "b": 50.0}, 16) == {"a": 255, "b": 26}
    # 20 sites of int8: 12 levels would be too coarse; 255 levels in 32 bits
    many = secagg.integer_weights({f"s{i}": 10.0 + i for i in range(20)}, 8)
    assert max(many.values()) == 255 and secagg.ring_bits(sum(many.values()), 8) == 32


def test_pair_seeds_agree_and_differ_by_round_epoch_and_pair(tmp_path):
    names, keys = _sites(3, tmp_path)
    a, b, c = names

    def seed(x, y, rnd=1, epoch=1):
        return secagg.pair_seed(keys[x], keys[y].public_key(), federation="fed", run="run1",
                                rnd=rnd, epoch=epoch, a=x, b=y)

    assert seed(a, b) == seed(b, a)
    assert len({seed(a, b), seed(a, c), seed(a, b, rnd=2), seed(a, b, epoch=2)}) == 4
    # the key file is the same key after a restart, and 0600
    assert secagg.public_b64(secagg.site_key(tmp_path / a, "run1")) == secagg.public_b64(keys[a])
    assert (tmp_path / a).glob("secagg-*.key").__next__().stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = PKI.init(tmp_path_factory.mktemp("sa") / "pki", "fed")
    for site in ("north", "south"):
        p.issue("site", site)
    return p


def test_key_records_are_signed_and_checked_against_the_ca(pki, tmp_path):
    key = secagg.site_key(tmp_path, "run1")
    signer = Signer(pki.dir / "north.crt", pki.dir / "north.key")
    verifier = Verifier(pki.dir / "ca.crt")
    record = secagg.key_record("fed", "run1", "north", key, signer)
    public = secagg.check_key_record(record, "fed", "run1", "north", verifier)
    assert secagg.public_b64(key) == record["x25519"]
    assert public.public_bytes_raw() == key.public_key().public_bytes_raw()
    other = secagg.public_b64(secagg.site_key(tmp_path / "x", "run1"))
    as_south = signer.sign({k: v for k, v in record.items() if k not in ("cert", "sig")}
                           | {"site": "south"})  # north signing a key in south's name
    cases = [({**record, "x25519": other}, "bad_signature"),  # a key swapped in transit
             (as_south, "signer_mismatch"),
             ({**record, "run": "run2"}, "bad_key_record")]
    for rec, reason in cases:
        site = "south" if reason == "signer_mismatch" else "north"
        with pytest.raises(ProtocolError) as info:
            secagg.check_key_record(rec, "fed", "run1", site, verifier)
        assert info.value.reason == reason


def test_a_site_reveals_only_the_last_complete_epoch_and_never_for_a_subset(tmp_path):
    st = SecureState(tmp_path)
    abc, ab = ["a", "b", "c"], ["a", "b"]
    s1 = st.begin("run", 3, 10, abc)
    assert st.begin("run", 3, 10, abc) == s1  # the same epoch again after a restart
    with pytest.raises(ProtocolError, match="epoch_incomplete"):
        st.reveal("run", 3, 10, abc, ab)  # c's update did not arrive: no seed
    s2 = st.begin("run", 3, 11, ab)  # run again among the survivors
    assert s2 != s1
    with pytest.raises(ProtocolError, match="not_last_epoch"):
        st.reveal("run", 3, 10, abc, abc)  # a late c: epoch 10 is never opened
    with pytest.raises(ProtocolError, match="stale_epoch"):
        st.begin("run", 3, 9, ab)
    assert st.reveal("run", 3, 11, ab, ab) == s2
    again = SecureState(tmp_path)  # the rules survive a restart
    with pytest.raises(ProtocolError, match="already_revealed"):
        again.begin("run", 3, 12, ["a"])  # a subset after a reveal: would allow subtraction
    assert again.begin("run", 3, 12, ab) not in (s1, s2)  # the same members: fresh masks
    with pytest.raises(ProtocolError, match="already_revealed"):
        again.begin("run", 3, 13, ["a", "c"])
    assert again.begin("run", 4, 1, ["a"]) is not None  # a new round starts afresh
    assert (tmp_path / "secagg-state.json").stat().st_mode & 0o777 == 0o600


def test_a_self_mask_secret_is_recovered_from_a_majority_of_sealed_shares(tmp_path):
    names, keys = _sites(5, tmp_path)
    publics = {s: keys[s].public_key() for s in names}
    lost = names[2]
    secret = secagg.self_seed()
    ctx = {"federation": "fed", "run": "run1", "rnd": 3, "epoch": 9}
    sealed = secagg.seal_shares(secret, lost, names, keys[lost],
                                {p: publics[p] for p in names if p != lost}, **ctx)
    assert set(sealed) == set(names) - {lost}
    opened = {p: secagg.open_share(sealed[p], lost, p, keys[p], publics[lost], **ctx)
              for p in sealed}
    commit = secagg.commitment(secret)
    assert secagg.threshold(5) == 3
    assert secagg.recover_secret(list(opened.values())[:3], commit) == secret
    assert secagg.recover_secret(list(opened.values()), commit) == secret
    assert secagg.recover_secret(list(opened.values())[:2], commit) is None  # too few
    bad = list(opened.values())[:3]
    bad[0] = bad[0][:4] + ("0" if bad[0][4] != "0" else "1") + bad[0][5:]
    assert secagg.recover_secret(bad, commit) is None  # a wrong share is caught
    # only the addressee opens a share: another peer, or the coordinator relaying it, cannot
    other = names[0] if names[0] != lost else names[1]
    with pytest.raises(ProtocolError, match="bad_share"):
        secagg.open_share(sealed[names[4]], lost, other, keys[other], publics[lost], **ctx)
    with pytest.raises(ProtocolError, match="bad_share"):  # bound to the round and epoch
        secagg.open_share(sealed[names[4]], lost, names[4], keys[names[4]], publics[lost],
                          **{**ctx, "epoch": 10})

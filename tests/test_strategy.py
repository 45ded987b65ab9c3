"""Strategies behind the seam: pure math against plain references, and the plan's choice."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from agent.config import CompressionSpec, ConfigError, StrategySpec, plan_from_dict
from agent.federation.aggregate import fedavg
from agent.federation.codec import encode_update
from agent.federation.strategy import (
    REGISTRY,
    make_strategy,
    server_optimizer_step,
    weight_caps,
)

K = kernels.get_backend("cpu")
SPECS = [CompressionSpec(), CompressionSpec(quantize="int8"),
         CompressionSpec(quantize="int8", topk_fraction=0.1)]


def _updates(n: int, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) * (1 + i) for i in range(k)]


def _run_round(strategy, params, updates, weights, spec, sites=None, seeds=None):
    agg = strategy.new_round(1)
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        seed = i if seeds is None else seeds[i]
        enc = encode_update(u, spec, seed=seed, kernels=K, residual=np.zeros_like(u))
        stream = agg.open_update((sites or [f"s{j}" for j in range(len(updates))])[i],
                                 enc.meta, w, len(enc.body))
        for a in range(0, len(enc.body), 4096):  # as chunks arrive
            stream.feed(enc.body[a:a + 4096])
        stream.finish()
    return agg, agg.finalize(params)


@pytest.mark.parametrize("spec", SPECS, ids=["f32", "int8", "int8-top10"])
def test_fedavg_through_the_seam_is_the_reference_weighted_mean(spec):
    n = 70_001
    params = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    updates, weights = _updates(n, 4, seed=2), [10.0, 30.0, 5.0, 55.0]
    strategy = make_strategy(StrategySpec(), n, 4, spec, K)
    agg, out = _run_round(strategy, params, updates, weights, spec)
    if spec.quantize == "none" and spec.topk_fraction == 1:
        np.testing.assert_allclose(out, fedavg(params, updates, weights), rtol=1e-5, atol=1e-6)
    else:  # the reference over what the codec delivers
        decoded = []
        for i, u in enumerate(updates):
            one = make_strategy(StrategySpec(), n, 1, spec, K)
            _a, o = _run_round(one, np.zeros(n, np.float32), [u], [1.0], spec, seeds=[i])
            decoded.append(o)
            assert np.corrcoef(o, u)[0, 1] > 0.3, i  # it is that update, compressed
        np.testing.assert_allclose(out, fedavg(params, decoded, weights), rtol=1e-4, atol=1e-5)
    assert agg.total_weight == sum(weights) and agg.discounted == {}


def test_server_optimizer_step_matches_the_papers_update_written_out():
    rng = np.random.default_rng(3)
    n = 1000
    params = rng.standard_normal(n).astype(np.float32)
    deltas = [rng.standard_normal(n) * 0.1 for _ in range(5)]
    for rule in ("fedadam", "fedyogi"):
        lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
        m, v = np.zeros(n), np.full(n, tau ** 2)
        mm, vv, p = m.copy(), v.copy(), params.astype(np.float64)
        out = params
        for d in deltas:
            out = server_optimizer_step(out, d.astype(np.float32), m, v, rule=rule, lr=lr,
                                        beta1=b1, beta2=b2, tau=tau)
            d = d.astype(np.float32).astype(np.float64)
            mm = b1 * mm + (1 - b1) * d
            if rule == "fedadam":
                vv = b2 * vv + (1 - b2) * d * d
            else:
                vv = vv - (1 - b2) * d * d * np.sign(vv - d * d)
            p = (p + lr * mm / (np.sqrt(vv) + tau)).astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(out, p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m, mm, rtol=1e-12)
        np.testing.assert_allclose(v, vv, rtol=1e-12)


def test_fedadam_state_round_trips_and_continues_the_same_optimizer():
    n, spec = 5000, CompressionSpec()
    params = np.zeros(n, np.float32)
    rounds = [_updates(n, 3, seed=s) for s in range(4)]
    a = make_strategy(StrategySpec(name="fedadam"), n, 3, spec, K)
    p = params
    for u in rounds:
        _agg, p = _run_round(a, p, u, [1.0, 2.0, 3.0], spec)
    b = make_strategy(StrategySpec(name="fedadam"), n, 3, spec, K)
    q = params
    for i, u in enumerate(rounds):
        if i == 2:  # a "restart": a new strategy loads the saved state
            saved = {k: v.copy() for k, v in b.state().items()}
            b = make_strategy(StrategySpec(name="fedadam"), n, 3, spec, K)
            b.load_state(saved)
        _agg, q = _run_round(b, q, u, [1.0, 2.0, 3.0], spec)
    np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="malformed"):
        b.load_state({"m": np.zeros(3), "v": np.zeros(n)})


def test_weight_caps_keep_every_site_within_the_fraction():
    counts = {"a": 100.0, "b": 100.0, "c": 100.0, "liar": 1e9}
    caps = weight_caps(counts, 0.4)
    total = sum(caps.values())
    assert all(c <= 0.4 * total * (1 + 1e-9) for c in caps.values())
    assert caps["a"] == caps["b"] == caps["c"] == 100.0  # honest sites keep their weight
    assert caps["liar"] == pytest.approx(200.0)  # 0.4 of 500
    assert weight_caps(counts, 1.0) == counts  # no cap: a site's own declared count
    two_liars = weight_caps({"a": 10.0, "b": 10.0, "x": 1e6, "y": 1e7}, 0.3)
    t = sum(two_liars.values())
    assert all(c <= 0.3 * t * (1 + 1e-9) for c in two_liars.values())


def test_plan_strategy_names_and_options_are_checked():
    base = {"federation": {"id": "f", "sites": ["a", "b", "c", "d"], "rounds": 2},
            "target": {"column": "y"}, "features": [{"name": "x", "type": "numeric"}]}
    plan = plan_from_dict({**base, "strategy": {"name": "fedyogi", "server_lr": 0.02,
                                                "max_weight_fraction": 0.5}}, "p.toml")
    assert plan.strategy == StrategySpec(name="fedyogi", server_lr=0.02, max_weight_fraction=0.5)
    assert plan_from_dict({**base, "strategy": {"name": "fedavg"}}, "p").to_dict()["strategy"] \
        == "fedavg"  # the digest of a plain FedAvg plan is what it was before options
    with pytest.raises(ConfigError) as bad:
        plan_from_dict({**base, "strategy": {"name": "fedsgd"}}, "p.toml")
    assert str(bad.value) == ("p.toml: strategy.name: must be one of fedavg, fedprox, fedadam, "
                              "fedyogi, median, trimmed_mean, multi_krum, norm_bound; got "
                              "'fedsgd'")
    with pytest.raises(ConfigError, match="trim_fraction: unknown key"):  # not a median option
        plan_from_dict({**base, "strategy": {"name": "median", "trim_fraction": 0.2}}, "p")
    assert set(REGISTRY) >= {"fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean",
                             "multi_krum", "norm_bound"}


def test_a_holding_rule_too_big_for_memory_or_krum_with_too_few_sites_is_a_config_error():
    with pytest.raises(ConfigError, match="holds every update"):
        make_strategy(StrategySpec(name="median"), 200_000_000, 10, CompressionSpec(), K)
    with pytest.raises(ConfigError, match="more than 2 x byzantine"):
        make_strategy(StrategySpec(name="multi_krum", byzantine=1), 100, 4, CompressionSpec(), K)


def _holding_round(name, updates, weights, **options):
    n = updates[0].size
    spec = CompressionSpec()
    strategy = make_strategy(StrategySpec(name=name, **options), n, len(updates), spec, K)
    return _run_round(strategy, np.zeros(n, np.float32), updates, weights, spec,
                      sites=[f"s{i}" for i in range(len(updates))])


def test_median_and_trimmed_mean_through_the_seam_equal_numpy():
    updates = _updates(10_007, 5, seed=7)
    stack = np.stack(updates)
    _agg, out = _holding_round("median", updates, [1.0] * 5, bucket_size=1)
    np.testing.assert_array_equal(out, np.median(stack, axis=0).astype(np.float32))
    _agg, out = _holding_round("trimmed_mean", updates, [1.0] * 5, trim_fraction=0.2)
    want = np.sort(stack, axis=0)[1:4].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(out, want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_bucketed_median_is_the_median_of_weighted_bucket_means_whatever_the_arrival_order():
    updates = _updates(4001, 5, seed=11)
    weights = [3.0, 1.0, 2.0, 5.0, 4.0]
    _agg, out = _holding_round("median", updates, weights, bucket_size=2)
    # the buckets, written out: round 1's permutation of the sites sorted by name (s0..s4)
    order = list(np.random.default_rng([1, 5]).permutation(5))
    means = [np.average(np.stack([updates[i] for i in g]), axis=0,
                        weights=[weights[i] for i in g]) for g in (order[:2], order[2:4],
                                                                   order[4:])]
    np.testing.assert_allclose(out, np.median(np.stack(means), axis=0), rtol=1e-5, atol=1e-6)
    # the same updates arriving in another order give the same model
    perm = [3, 0, 4, 1, 2]
    strategy = make_strategy(StrategySpec(name="median", bucket_size=2), 4001, 5,
                             CompressionSpec(), K)
    _a, again = _run_round(strategy, np.zeros(4001, np.float32), [updates[i] for i in perm],
                           [weights[i] for i in perm], CompressionSpec(),
                           sites=[f"s{i}" for i in perm])
    np.testing.assert_array_equal(again, out)


def test_bucketing_keeps_three_buckets_so_one_bad_site_is_outvoted():
    rng = np.random.default_rng(12)
    base = rng.standard_normal(3000).astype(np.float32)
    honest = [base + 0.1 * rng.standard_normal(3000).astype(np.float32) for _ in range(4)]
    for rnd in range(1, 8):  # wherever the bucket draw puts the attacker
        strategy = make_strategy(StrategySpec(name="median", bucket_size=2), 3000, 5,
                                 CompressionSpec(), K)
        agg = strategy.new_round(rnd)
        for i, u in enumerate([*honest, -100.0 * base]):
            enc = encode_update(u, CompressionSpec(), seed=i, kernels=K,
                                residual=np.zeros_like(u))
            stream = agg.open_update(f"s{i}", enc.meta, 1.0, len(enc.body))
            stream.feed(enc.body)
            stream.finish()
        out = agg.finalize(np.zeros(3000, np.float32))
        assert np.corrcoef(out, base)[0, 1] > 0.95, rnd
    # 4 sites cannot make 3 buckets of 2: the plain median, not a mean of two halves
    four = _updates(500, 4, seed=13)
    _agg, out = _holding_round("median", four, [1.0] * 4, bucket_size=2)
    np.testing.assert_array_equal(out, np.median(np.stack(four), axis=0).astype(np.float32))


def test_multi_krum_leaves_out_the_update_far_from_the_rest_and_says_so():
    rng = np.random.default_rng(8)
    base = rng.standard_normal(5000).astype(np.float32)
    honest = [base + 0.05 * rng.standard_normal(5000).astype(np.float32) for _ in range(5)]
    attacker = -10.0 * base
    weights = [1.0, 2.0, 1.0, 2.0, 1.0, 50.0]
    agg, out = _holding_round("multi_krum", [*honest, attacker], weights, byzantine=1)
    assert agg.discounted == {"s5": "krum_outlier"}
    np.testing.assert_allclose(out, fedavg(np.zeros(5000, np.float32), honest, weights[:5]),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("action", ["clip", "reject"])
def test_norm_bound_clips_or_rejects_an_update_far_longer_than_the_median(action):
    updates = _updates(4000, 4, seed=9)  # norms grow 1x..4x
    scaled = 30.0 * updates[0]
    agg, out = _holding_round("norm_bound", [*updates, scaled], [1.0] * 5, norm_bound=3.0,
                              norm_action=action)
    assert list(agg.discounted) == ["s4"] and agg.discounted["s4"].startswith(
        "clipped_" if action == "clip" else "rejected_")
    norms = np.array([np.linalg.norm(u) for u in [*updates, scaled]])
    bound = 3.0 * np.median(norms)
    kept = [*updates, scaled * (bound / norms[4])] if action == "clip" else updates
    np.testing.assert_allclose(out, np.mean(kept, axis=0), rtol=1e-4, atol=1e-6)


def test_a_holding_rule_counts_only_whole_updates():
    updates = _updates(3000, 3, seed=10)
    n, spec = 3000, CompressionSpec()
    strategy = make_strategy(StrategySpec(name="median"), n, 3, spec, K)
    agg = strategy.new_round(1)
    for i, u in enumerate(updates):
        enc = encode_update(u, spec, seed=i, kernels=K, residual=np.zeros_like(u))
        stream = agg.open_update(f"s{i}", enc.meta, 1.0, len(enc.body))
        if i < 2:
            stream.feed(enc.body)
            stream.finish()
        else:
            stream.feed(enc.body[:100])  # stopped part way
    out = agg.finalize(np.zeros(n, np.float32))
    assert agg.discounted == {"s2": "incomplete_update"}
    np.testing.assert_array_equal(out, np.median(np.stack(updates[:2]), axis=0))

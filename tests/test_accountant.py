"""The RDP accountant (agent/privacy/accountant.py) against a direct computation and against
Google's dp-accounting.

The dp-accounting figures below were computed with dp-accounting 0.6.0 (in a scratch virtual
environment, not a project dependency) by this script, with our order grid:

    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, rdp
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(GaussianDpEvent(sigma), count)
    # sampled: acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), count)
    acc.get_epsilon_and_optimal_order(delta)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent.privacy.accountant import (
    ORDERS,
    PrivacyAccountant,
    gaussian_rdp,
    noise_multiplier_for_budget,
    rdp_to_epsilon,
    subsampled_gaussian_rdp,
)

# (sigma, rounds, delta) -> (epsilon, order) by dp-accounting 0.6.0, Gaussian mechanism
DP_ACCOUNTING_GAUSSIAN = {
    (1.0, 10, 1e-5): (19.05359753163139, 2.5),
    (2.0, 100, 1e-5): (35.12663110385034, 2.0),
    (0.8, 50, 1e-6): (84.31522861104409, 1.5),
    (5.0, 1000, 1e-5): (48.75711504232587, 1.75),
    (1.5, 2, 1e-5): (4.428578309021146, 6.0),
}
# (q, sigma, steps, delta) -> (epsilon, order), Poisson-subsampled Gaussian (DP-SGD); the
# first is Abadi et al. 2016's MNIST setting (q = 0.01, sigma = 4, 10 000 steps)
DP_ACCOUNTING_SAMPLED = {
    (0.01, 4.0, 10000, 1e-5): (1.0354900660362436, 17.0),
    (0.01, 1.1, 1000, 1e-5): (1.7252908180449444, 9.0),
    (0.05, 1.0, 200, 1e-5): (5.371115403362253, 4.0),
    (0.256, 1.3, 40, 1e-5): (8.452878953156706, 3.0),
    (0.1, 0.7, 500, 1e-5): (39.53657281947108, 1.75),  # a fractional best order
}


def test_the_gaussian_rdp_is_alpha_over_two_sigma_squared():
    sigma = 1.7
    np.testing.assert_array_equal(gaussian_rdp(sigma), np.array(ORDERS) / (2 * sigma ** 2))


@pytest.mark.parametrize(("sigma", "rounds", "delta"), list(DP_ACCOUNTING_GAUSSIAN))
def test_gaussian_epsilon_matches_a_direct_computation_and_dp_accounting(sigma, rounds, delta):
    acc = PrivacyAccountant()
    for _ in range(rounds):
        acc.step(sigma)
    eps, order = acc.epsilon(delta)
    want, want_order = DP_ACCOUNTING_GAUSSIAN[sigma, rounds, delta]
    assert eps == pytest.approx(want, rel=1e-9) and order == want_order
    # direct: the conversion minimised over a fine continuous grid of orders; ours (a
    # coarser grid) can only be larger, and by little
    a = np.linspace(1.001, 600, 2_000_000)
    direct = float(np.min(rounds * a / (2 * sigma ** 2) + np.log1p(-1 / a)
                          - (math.log(delta) + np.log(a)) / (a - 1)))
    assert direct <= eps <= direct * 1.01


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), list(DP_ACCOUNTING_SAMPLED))
def test_dp_sgd_epsilon_matches_dp_accounting(q, sigma, steps, delta):
    acc = PrivacyAccountant()
    acc.step(sigma, q=q, count=steps)
    eps, order = acc.epsilon(delta)
    want, want_order = DP_ACCOUNTING_SAMPLED[q, sigma, steps, delta]
    assert eps == pytest.approx(want, rel=1e-9) and order == want_order


def test_subsampling_is_monotone_and_q1_is_the_plain_gaussian():
    np.testing.assert_array_equal(subsampled_gaussian_rdp(1.0, 1.3), gaussian_rdp(1.3))
    integer = [i for i, a in enumerate(ORDERS) if float(a).is_integer()]
    lo, hi = subsampled_gaussian_rdp(0.01, 1.3), subsampled_gaussian_rdp(0.1, 1.3)
    assert np.all(lo[integer] < hi[integer]) and np.all(hi[integer] < gaussian_rdp(1.3)[integer])
    assert np.all(subsampled_gaussian_rdp(0.1, 2.0)[integer] < hi[integer])
    # fractional orders (their own series) fall between their integer neighbours
    # (a series that does not converge leaves its order out, as inf: q = 0.1 at alpha 1.25)
    assert np.all(np.isfinite(lo)) and np.all(np.diff(lo) > 0)
    assert np.all(np.diff(hi[np.isfinite(hi)]) > 0) and np.isinf(hi[0])


def test_the_state_round_trips_and_a_corrupted_state_is_refused():
    acc = PrivacyAccountant()
    acc.step(1.2, count=3)
    acc.step(1.1, q=0.02, count=500)
    doc = json.loads(json.dumps(acc.to_dict(), allow_nan=False))
    again = PrivacyAccountant.from_dict(doc)
    assert again.epsilon(1e-5) == acc.epsilon(1e-5) and again.steps == acc.steps
    bad = [({**doc, "version": 2}, "version"),
           ({**doc, "orders": doc["orders"][:-1]}, "orders"),
           ({**doc, "rdp": doc["rdp"][:-1]}, "length"),
           ({**doc, "rdp": [0.0] * len(doc["rdp"])}, "does not follow"),  # reset to zero
           ({**doc, "steps": doc["steps"][:1]}, "does not follow"),  # a step dropped
           ({**doc, "steps": [{**doc["steps"][0], "count": -1}]}, "count"),
           ({**doc, "steps": [{**doc["steps"][0], "kind": "laplace"}]}, "kind"),
           ({**doc, "steps": [{**doc["steps"][0], "sigma": 0}]}, "sigma")]
    for state, words in bad:
        with pytest.raises(ValueError, match=words):
            PrivacyAccountant.from_dict(state)


def test_would_exceed_is_true_exactly_when_the_next_step_goes_over():
    acc = PrivacyAccountant()
    acc.step(1.5, count=2)
    now = acc.epsilon(1e-5)[0]
    over, after = acc.would_exceed(1.5, 1.0, 1, budget=10.0, delta=1e-5)
    assert after > now and not over
    assert acc.would_exceed(1.5, 1.0, 1, budget=after * 0.999, delta=1e-5)[0]
    assert not acc.would_exceed(1.5, 1.0, 1, budget=after, delta=1e-5)[0]


@pytest.mark.parametrize(("eps", "rounds"), [(1.0, 10), (8.0, 15), (50.0, 3)])
def test_the_calibrated_noise_is_the_least_that_fits_the_budget(eps, rounds):
    sigma = noise_multiplier_for_budget(eps, 1e-5, rounds)

    def spent(s):
        acc = PrivacyAccountant()
        acc.step(s, count=rounds)
        return acc.epsilon(1e-5)[0]

    assert spent(sigma) <= eps < spent(sigma * (1 - 1e-3))


def test_conversion_rejects_a_bad_delta():
    with pytest.raises(ValueError, match="delta"):
        rdp_to_epsilon(gaussian_rdp(1.0), ORDERS, 0.0)

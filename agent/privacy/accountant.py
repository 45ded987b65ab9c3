"""Renyi-DP accounting of the Gaussian mechanism, with and without Poisson subsampling.

Orders: TF-Privacy's classic grid (fractional 1.25-4.5, the integers 5-63, then 128, 256,
512); dp-accounting's `RdpAccountant(orders=ORDERS)` gives the same epsilons (the tests).
Conversion to (epsilon, delta): Balle et al. 2020, "Hypothesis testing interpretations and Renyi
differential privacy" (Prop. 12; also Canonne, Kamath & Steinke 2020), the one Opacus,
TF-Privacy and dp-accounting use:
    eps = min over alpha of  rdp(alpha) + log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1)
The subsampled Gaussian (DP-SGD) follows Mironov, Talwar & Zhang 2019, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism" (Sec. 3.3): the exact finite sum for integer orders,
the converging two-sided series for fractional ones (as dp-accounting computes it, without
scipy); an order whose series does not converge is left out (infinite RDP: never a smaller
epsilon).

The state is plain data, checked on load: the coordinator keeps it in its checkpoint, and a
state whose RDP does not follow from its recorded steps is refused (it never resets).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ORDERS: tuple[float, ...] = (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5,
                             *map(float, range(5, 64)), 128.0, 256.0, 512.0)
KINDS = ("gaussian", "subsampled_gaussian")
STATE_VERSION = 1


def gaussian_rdp(sigma: float, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism of noise multiplier sigma: alpha / (2 sigma^2)."""
    _check_sigma(sigma)
    return np.asarray(orders, dtype=np.float64) / (2.0 * sigma * sigma)


def subsampled_gaussian_rdp(q: float, sigma: float, orders: tuple[float, ...] = ORDERS
                            ) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian at rate q, per order."""
    _check_sigma(sigma)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if q == 1.0:
        return gaussian_rdp(sigma, orders)
    out = np.full(len(orders), np.inf)
    if q == 0.0:
        return np.zeros(len(orders))
    for i, alpha in enumerate(orders):
        log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() \
            else _log_a_frac(q, sigma, alpha)
        out[i] = log_a / (alpha - 1)
    return out


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log of sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2)
             for k in range(alpha + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


_MAX_FRAC_TERMS = 1000


def _log_add(x: float, y: float) -> float:
    a, b = (x, y) if x < y else (y, x)
    return b if a == -math.inf else b + math.log1p(math.exp(a - b))


def _log_erfc(x: float) -> float:
    if x < 25.0:
        return math.log(math.erfc(x))
    return (-0.5 * math.log(math.pi) - math.log(x) - x * x
            - 0.5 * x ** -2 + 0.625 * x ** -4 - 37.0 / 24.0 * x ** -6 + 353.0 / 64.0 * x ** -8)


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for a fractional order (Mironov et al. 2019, Sec. 3.3): two series that
    converge for 0 < q < 1; inf when they do not within `_MAX_FRAC_TERMS` terms."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq, s2 = math.log(q), math.log1p(-q), math.sqrt(2.0) * sigma
    last0 = last1 = -math.inf
    for i in range(_MAX_FRAC_TERMS):
        coef = math.lgamma(alpha + 1.0) - math.lgamma(i + 1.0) - math.lgamma(alpha - i + 1.0)
        j = alpha - i
        s0 = (coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma * sigma)
              + math.log(0.5) + _log_erfc((i - z0) / s2))
        s1 = (coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma * sigma)
              + math.log(0.5) + _log_erfc((z0 - j) / s2))
        log_a0, log_a1 = _log_add(log_a0, s0), _log_add(log_a1, s1)
        total = _log_add(log_a0, log_a1)
        if s0 < last0 and s1 < last1 and max(s0, s1) < total - 30.0:
            return total
        last0, last1 = s0, s1
    return math.inf


def rdp_to_epsilon(rdp: np.ndarray, orders: tuple[float, ...], delta: float
                   ) -> tuple[float, float]:
    """(epsilon, the order that gives it) for a composed RDP curve and delta."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    eps[np.isnan(eps)] = np.inf
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def _check_sigma(sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise multiplier must be positive and finite, got {sigma}")


def _rdp_of(kind: str, q: float, sigma: float) -> np.ndarray:
    return gaussian_rdp(sigma) if kind == "gaussian" else subsampled_gaussian_rdp(q, sigma)


class PrivacyAccountant:
    """The privacy spent so far: the mechanisms composed (kind, q, sigma, count) and their
    summed RDP curve."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.rdp = np.zeros(len(ORDERS))

    @staticmethod
    def _curve(sigma: float, q: float, count: int) -> tuple[str, np.ndarray]:
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"count must be a positive integer, got {count!r}")
        kind = "gaussian" if q >= 1.0 else "subsampled_gaussian"
        return kind, count * _rdp_of(kind, q, sigma)

    def step(self, sigma: float, q: float = 1.0, count: int = 1) -> None:
        """Compose `count` releases of the (subsampled) Gaussian mechanism."""
        kind, curve = self._curve(sigma, q, count)
        last = self.steps[-1] if self.steps else None
        if last is not None and (last["kind"], last["q"], last["sigma"]) == (kind, q, sigma):
            last["count"] += count
        else:
            self.steps.append({"kind": kind, "q": float(q), "sigma": float(sigma),
                               "count": count})
        self.rdp = self.rdp + curve

    def epsilon(self, delta: float) -> tuple[float, float]:
        """(epsilon, best order) spent so far; (0, ...) before any release."""
        if not self.steps:
            return 0.0, ORDERS[0]
        return rdp_to_epsilon(self.rdp, ORDERS, delta)

    def would_exceed(self, sigma: float, q: float, count: int, budget: float, delta: float
                     ) -> tuple[bool, float]:
        """(whether one more such step would spend more than `budget`, the epsilon after it):
        asked before a round, so the budget is never overrun."""
        _, curve = self._curve(sigma, q, count)
        eps = rdp_to_epsilon(self.rdp + curve, ORDERS, delta)[0]
        return eps > budget, eps

    def to_dict(self) -> dict[str, Any]:
        rdp = [None if math.isinf(v) else v for v in self.rdp.tolist()]  # JSON has no inf
        return {"version": STATE_VERSION, "orders": list(ORDERS), "rdp": rdp,
                "steps": [dict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, doc: Any) -> PrivacyAccountant:
        """The accountant a checkpoint kept; ValueError naming what is wrong otherwise."""
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError("accountant state: not a version 1 object")
        if doc.get("orders") != list(ORDERS):
            raise ValueError("accountant state: orders differ from this version's grid")
        steps = doc.get("steps")
        if not isinstance(steps, list):
            raise ValueError("accountant state: steps is not a list")
        acc = cls()
        for i, s in enumerate(steps):
            if not isinstance(s, dict) or s.get("kind") not in KINDS:
                raise ValueError(f"accountant state: steps[{i}] has no known kind")
            q, sigma, count = s.get("q"), s.get("sigma"), s.get("count")
            if not (isinstance(q, (int, float)) and 0 < q <= 1):
                raise ValueError(f"accountant state: steps[{i}].q must be in (0, 1]")
            if (s["kind"] == "gaussian") != (q == 1):
                raise ValueError(f"accountant state: steps[{i}] kind does not match q")
            if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
                raise ValueError(f"accountant state: steps[{i}].sigma must be positive")
            if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
                raise ValueError(f"accountant state: steps[{i}].count must be a positive "
                                 "integer")
            acc.steps.append({"kind": s["kind"], "q": float(q), "sigma": float(sigma),
                              "count": count})
            acc.rdp = acc.rdp + count * _rdp_of(s["kind"], float(q), float(sigma))
        rdp = doc.get("rdp")
        if not isinstance(rdp, list) or len(rdp) != len(ORDERS):
            raise ValueError("accountant state: rdp has the wrong length")
        try:
            kept = np.array([np.inf if v is None else v for v in rdp], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("accountant state: rdp is not a list of numbers") from None
        same_inf = np.array_equal(np.isinf(kept), np.isinf(acc.rdp))
        finite = ~np.isinf(acc.rdp)
        if not same_inf or not np.allclose(kept[finite], acc.rdp[finite], rtol=1e-9, atol=0):
            raise ValueError("accountant state: rdp does not follow from its steps")
        return acc


def noise_multiplier_for_budget(epsilon: float, delta: float, rounds: int, q: float = 1.0,
                                steps_per_round: int = 1) -> float:
    """The smallest sigma (to 1e-4 relative) with which `rounds` rounds stay within epsilon."""
    if not (epsilon > 0 and rounds >= 1):
        raise ValueError("epsilon must be positive and rounds at least 1")

    def spent(sigma: float) -> float:
        acc = PrivacyAccountant()
        acc.step(sigma, q=q, count=rounds * steps_per_round)
        return acc.epsilon(delta)[0]

    lo, hi = 1e-3, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon}")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > epsilon else (lo, mid)
    return hi

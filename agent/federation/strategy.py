"""Strategies: how the coordinator combines the sites' updates into the next global model.

The seam between decoding and combining. `codec.UpdateStream` decodes and checks an update
frame by frame and hands each frame to a `FrameSink`; the strategy chooses the sink. A
strategy lives for the whole federation (its state, e.g. a server optimizer's moments, goes
into the coordinator's checkpoint); each round it opens an `Aggregation`, which takes the
round's updates (`open_update`) and turns them into new parameters (`finalize`).

Two kinds of rule, by what they must hold in memory (docs/strategies.md):
- streaming, O(model): fedavg, fedprox, fedadam, fedyogi. Each update is summed with its
  weight as its chunks arrive; nothing per site is kept.
- holding, O(sites x model): median, trimmed_mean, multi_krum, norm_bound. A rule that
  compares updates needs all of them; each is decoded into a float32 vector of its own. The
  plan is refused at start when sites x model x 4 bytes exceeds `HOLD_LIMIT_BYTES`.

Which sites a rule discounted, and why, is reported per round (`discounted`: site -> reason)
into metrics.json, the coordinator's status and the report. The math is in pure functions
(`server_optimizer_step` here; the robust statistics are kernels: `kernels.*_robust`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from agent.config import STRATEGIES, CompressionSpec, ConfigError, StrategySpec
from agent.errors import ProtocolError
from agent.federation.aggregate import FedAvgAccumulator
from agent.federation.codec import UpdateStream
from kernels.ref_robust import multi_krum_select  # pure numpy, for every backend

HOLD_LIMIT_BYTES = 4 << 30  # what the holding rules may keep of a round's updates


class Aggregation(Protocol):
    """One round's combination of updates."""

    discounted: dict[str, str]  # site -> why its update counted less or not at all

    def open_update(self, site: str, meta: dict[str, Any], weight: float,
                    body_len: int | None) -> UpdateStream: ...

    @property
    def total_weight(self) -> float: ...

    def partial(self) -> dict[str, float]: ...

    def finalize(self, params: np.ndarray) -> np.ndarray: ...


class Strategy(Protocol):
    name: str

    def new_round(self, rnd: int) -> Aggregation: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


# ---------------------------------------------------------------------- weights

def weight_caps(counts: dict[str, float], max_fraction: float) -> dict[str, float]:
    """The most weight each site may have: its own count, and no more than `max_fraction` of
    the total after capping. Water-filling: the j largest are lowered to one level L with
    L = f (rest + j L), the smallest j for which the next site is not above L; so one site's
    inflated count cannot raise the total it is measured against. Where no j works (f below
    1 / sites) every site gets the same weight."""
    caps = {s: float(c) for s, c in counts.items()}
    total = sum(caps.values())
    if not caps or max_fraction >= 1.0 or max(caps.values()) <= max_fraction * total:
        return caps
    order = sorted(caps, key=lambda s: -caps[s])
    for j in range(1, len(order)):
        denominator = 1.0 - max_fraction * j
        if denominator <= 0:
            break
        rest = sum(caps[s] for s in order[j:])
        level = max_fraction * rest / denominator
        if caps[order[j]] <= level:
            return {s: (min(c, level) if s in order[:j] else c) for s, c in caps.items()}
    low = min(caps.values())
    return {s: low for s in caps}


# ---------------------------------------------------------------------- streaming rules

class _FedAvgRound:
    """Sample-weighted mean of the updates, summed as they stream in."""

    def __init__(self, n: int, spec: CompressionSpec, kernels: ModuleType) -> None:
        self.acc = FedAvgAccumulator(n, kernels)
        self.spec = spec
        self.discounted: dict[str, str] = {}

    def open_update(self, site: str, meta: dict[str, Any], weight: float,
                    body_len: int | None) -> UpdateStream:
        return self.acc.open_update(meta, weight, self.spec, label=site, body_len=body_len)

    @property
    def total_weight(self) -> float:
        return self.acc.total_weight

    def partial(self) -> dict[str, float]:
        return self.acc.partial()

    def finalize(self, params: np.ndarray) -> np.ndarray:
        return self.acc.apply(params)

    def mean_update(self, params: np.ndarray) -> np.ndarray:
        """The weighted mean of the updates (for a caller that adds DP noise before applying
        it with `Strategy.apply_mean`)."""
        return self.acc.apply(params) - params


class FedAvg:
    name = "fedavg"

    def __init__(self, spec: StrategySpec, n: int, compression: CompressionSpec,
                 kernels: ModuleType) -> None:
        self.n, self.compression, self.kernels = n, compression, kernels

    def new_round(self, rnd: int) -> Aggregation:
        return _FedAvgRound(self.n, self.compression, self.kernels)

    def apply_mean(self, params: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """New parameters from a round's mean update (secure aggregation and DP compute the
        mean themselves)."""
        return (params.astype(np.float32) + mean.astype(np.float32)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        return None


def server_optimizer_step(params: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray,
                          *, rule: str, lr: float, beta1: float, beta2: float, tau: float
                          ) -> np.ndarray:
    """FedAdam / FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2):
    the mean update `delta` is the pseudo-gradient; `m` and `v` are updated in place and the
    new parameters returned. float64 inside, float32 out."""
    d = delta.astype(np.float64)
    m *= beta1
    m += (1.0 - beta1) * d
    d2 = d * d
    if rule == "fedadam":
        v *= beta2
        v += (1.0 - beta2) * d2
    elif rule == "fedyogi":
        v -= (1.0 - beta2) * d2 * np.sign(v - d2)
    else:
        raise ValueError(f"unknown server optimizer {rule!r}")
    return (params.astype(np.float64) + lr * m / (np.sqrt(v) + tau)).astype(np.float32)


class ServerOptimizer(FedAvg):
    """FedAvg's mean update, applied by a server-side Adam or Yogi step; its moments are
    strategy state (kept in the checkpoint: a restart continues the same optimizer)."""

    def __init__(self, spec: StrategySpec, n: int, compression: CompressionSpec,
                 kernels: ModuleType) -> None:
        super().__init__(spec, n, compression, kernels)
        self.name, self.spec = spec.name, spec
        self.m = np.zeros(n, dtype=np.float64)
        self.v = np.full(n, spec.tau ** 2, dtype=np.float64)  # v_0 = tau^2 (paper, Alg. 2)

    def new_round(self, rnd: int) -> Aggregation:
        return _ServerOptimizerRound(self)

    def apply_mean(self, params: np.ndarray, mean: np.ndarray) -> np.ndarray:
        s = self.spec
        return server_optimizer_step(params, mean, self.m, self.v, rule=self.name,
                                     lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key in ("m", "v"):
            value = state.get(key)
            if value is None or value.shape != (self.n,) or not np.all(np.isfinite(value)):
                raise ValueError(f"server optimizer state {key!r} missing or malformed")
        self.m, self.v = state["m"].astype(np.float64), state["v"].astype(np.float64)


class _ServerOptimizerRound(_FedAvgRound):
    def __init__(self, strategy: ServerOptimizer) -> None:
        super().__init__(strategy.n, strategy.compression, strategy.kernels)
        self.strategy = strategy

    def finalize(self, params: np.ndarray) -> np.ndarray:
        return self.strategy.apply_mean(params, super().finalize(params) - params)


# ---------------------------------------------------------------------- holding rules

class DenseUpdate:
    """A FrameSink that decodes one update into a float32 vector of its own."""

    def __init__(self, n: int, kernels: ModuleType) -> None:
        self.n = n
        self.vector = np.zeros(n, dtype=np.float32)
        self._k = kernels

    def dense_int8(self, f: int, a: int, q: np.ndarray, scales: np.ndarray, block: int) -> None:
        self._k.dequantize_accumulate(self.vector[a:a + q.size], q, scales, block, 1.0)

    def dense_f32(self, a: int, values: np.ndarray) -> None:
        self.vector[a:a + values.size] = values

    def sparse_int8(self, idx: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int
                    ) -> None:
        self._k.scatter_dequantize_accumulate(self.vector, idx, q, scales, block, 1.0)

    def sparse_f32(self, idx: np.ndarray, values: np.ndarray) -> None:
        self.vector[idx] = values

    def ended(self) -> None:
        return None


Rule = Callable[[np.ndarray, np.ndarray, list[str]], tuple[np.ndarray, dict[str, str]]]


class _HoldingRound:
    """Every update decoded whole, then combined by `rule(updates[k, n], weights[k], sites)`
    -> (mean update, discounted). Incomplete updates take no part (named as discounted)."""

    def __init__(self, n: int, spec: CompressionSpec, kernels: ModuleType, rule: Rule) -> None:
        self.n, self.spec, self.kernels, self.rule = n, spec, kernels, rule
        self.updates: list[tuple[str, UpdateStream, DenseUpdate, float]] = []
        self.discounted: dict[str, str] = {}
        self.closed = False

    def open_update(self, site: str, meta: dict[str, Any], weight: float,
                    body_len: int | None) -> UpdateStream:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        if self.closed:
            raise ProtocolError("round_closed")
        sink = DenseUpdate(self.n, self.kernels)
        stream = UpdateStream(sink, meta, self.spec, body_len)
        self.updates.append((site, stream, sink, float(weight)))
        return stream

    @property
    def total_weight(self) -> float:
        return sum(w for _, s, _d, w in self.updates if s.accepted)

    def partial(self) -> dict[str, float]:
        return {site: s.watermark / s.n for site, s, _d, _w in self.updates
                if not s.accepted and s.watermark > 0}

    def finalize(self, params: np.ndarray) -> np.ndarray:
        self.closed = True
        whole = [(site, d.vector, w) for site, s, d, w in self.updates if s.accepted]
        for site, s, _d, _w in self.updates:
            if not s.accepted:
                s.abandon(ProtocolError("round_closed"))
                self.discounted[site] = "incomplete_update"
        if not whole:
            raise ValueError("no complete updates to aggregate")
        sites = [site for site, _v, _w in whole]
        updates = np.stack([v for _s, v, _w in whole])
        weights = np.array([w for _s, _v, w in whole], dtype=np.float64)
        mean, discounted = self.rule(updates, weights, sites)
        self.discounted.update(discounted)
        return params.astype(np.float32) + mean.astype(np.float32)


def _weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (weights[:, None] * updates).sum(axis=0, dtype=np.float64) / weights.sum()


def bucket_means(updates: np.ndarray, weights: np.ndarray, sites: list[str], size: int,
                 rnd: int) -> np.ndarray:
    """The weighted means of random buckets of `size` updates, one row per bucket.

    A robust rule over bucket means, not raw updates, is close to the mean when hospitals
    differ (Karimireddy, He & Jaggi, ICLR 2022); f bad sites spoil at most f buckets. The size
    is lowered until there are at least 3 buckets (k > 2 x size), so the median of them still
    outvotes one spoiled bucket; with 4 or fewer sites that is the plain median. Buckets are
    drawn from the round number over the sites sorted by name: arrival order does not matter
    and a re-opened round draws the same ones.
    """
    k = updates.shape[0]
    size = max(1, min(size, (k - 1) // 2))
    if size == 1:
        return updates
    by_name = sorted(range(k), key=lambda i: sites[i])
    order = [by_name[i] for i in np.random.default_rng([rnd, k]).permutation(k)]
    groups = [np.array(order[a:a + size]) for a in range(0, k, size)]
    return np.stack([_weighted_mean(updates[g], weights[g]) for g in groups]).astype(np.float32)


class Holding(FedAvg):
    """The robust rules: coordinate-wise median, trimmed mean, multi-Krum, norm bound. They
    run on the CPU (held updates are host memory), whatever the backend that decodes."""

    def __init__(self, spec: StrategySpec, n: int, compression: CompressionSpec,
                 kernels: ModuleType) -> None:
        if kernels.__name__ == "kernels.gpu":
            import kernels as kernel_registry

            kernels = kernel_registry.get_backend("cpu")
        super().__init__(spec, n, compression, kernels)
        self.name, self.spec = spec.name, spec

    def new_round(self, rnd: int) -> Aggregation:
        rule: Rule = {"median": partial(self._median, rnd=rnd),
                      "trimmed_mean": self._trimmed_mean, "multi_krum": self._multi_krum,
                      "norm_bound": self._norm_bound}[self.name]
        return _HoldingRound(self.n, self.compression, self.kernels, rule)

    def _median(self, u: np.ndarray, w: np.ndarray, sites: list[str], *, rnd: int
                ) -> tuple[np.ndarray, dict[str, str]]:
        u = bucket_means(u, w, sites, self.spec.bucket_size, rnd)
        return self.kernels.coordinate_median(u), {}

    def _trimmed_mean(self, u: np.ndarray, w: np.ndarray, sites: list[str]
                      ) -> tuple[np.ndarray, dict[str, str]]:
        k = u.shape[0]
        # rounded up: with 5 sites and 10 % the rule still drops one value at each end
        trim = min(math.ceil(self.spec.trim_fraction * k - 1e-9), (k - 1) // 2)
        return self.kernels.trimmed_mean(u, trim), {}

    def _multi_krum(self, u: np.ndarray, w: np.ndarray, sites: list[str]
                    ) -> tuple[np.ndarray, dict[str, str]]:
        k, f = u.shape[0], self.spec.byzantine
        if k <= 2 * f + 2:  # too few updates for Krum's guarantee: plain FedAvg this round
            return _weighted_mean(u, w), {}
        m = self.spec.krum_select or k - f
        chosen = multi_krum_select(self.kernels.pairwise_sq_distances(u), f, min(m, k))
        keep = np.zeros(k, dtype=bool)
        keep[chosen] = True
        return (_weighted_mean(u[keep], w[keep]),
                {s: "krum_outlier" for s, kept in zip(sites, keep, strict=True) if not kept})

    def _norm_bound(self, u: np.ndarray, w: np.ndarray, sites: list[str]
                    ) -> tuple[np.ndarray, dict[str, str]]:
        norms = self.kernels.l2_norms(u)
        bound = self.spec.norm_bound * float(np.median(norms))
        discounted: dict[str, str] = {}
        keep = np.ones(u.shape[0], dtype=bool)
        for i, (site, norm) in enumerate(zip(sites, norms, strict=True)):
            if norm <= bound or bound <= 0:
                continue
            ratio = f"{norm / (bound / self.spec.norm_bound):.1f}x_median_norm"
            if self.spec.norm_action == "reject":
                keep[i] = False
                discounted[site] = f"rejected_{ratio}"
            else:
                self.kernels.clip_to_norm(u[i], bound)
                discounted[site] = f"clipped_{ratio}"
        return _weighted_mean(u[keep], w[keep]), discounted


# ---------------------------------------------------------------------- registry

REGISTRY: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedAvg,  # FedProx differs at the sites: their local steps
    "fedadam": ServerOptimizer, "fedyogi": ServerOptimizer,
    "median": Holding, "trimmed_mean": Holding, "multi_krum": Holding, "norm_bound": Holding,
}
HOLDING = frozenset({"median", "trimmed_mean", "multi_krum", "norm_bound"})
assert set(REGISTRY) == set(STRATEGIES), "every plan strategy has an implementation"


def make_strategy(spec: StrategySpec, n: int, n_sites: int, compression: CompressionSpec,
                  kernels: ModuleType, source: str = "plan") -> FedAvg:
    """The plan's strategy; a name without an implementation or a holding rule that would not
    fit in memory is a config error (exit status 2, one line)."""
    cls = REGISTRY.get(spec.name)
    if cls is None:
        raise ConfigError(source, "strategy.name", f"must be one of {', '.join(REGISTRY)}; got "
                                                   f"{spec.name!r}")
    if spec.name in HOLDING and n_sites * n * 4 > HOLD_LIMIT_BYTES:
        raise ConfigError(source, "strategy.name", f"{spec.name} holds every update: "
                          f"{n_sites} sites x {n} parameters x 4 bytes exceeds "
                          f"{HOLD_LIMIT_BYTES >> 20} MiB; use fedavg, fedadam or fedyogi, or "
                          "fewer parameters")
    if spec.name == "multi_krum" and n_sites <= 2 * spec.byzantine + 2:
        raise ConfigError(source, "strategy.byzantine", f"multi_krum needs more than "
                          f"2 x byzantine + 2 sites; the plan has {n_sites}")
    return cls(spec, n, compression, kernels)

"""FedAvg as pure functions over flat vectors: updates in, new parameters out.

The coordinator streams: each update is folded into one accumulator as it arrives, so memory
grows with the model, never with sites x model. Weights are validated before any math (total
weight must be positive and finite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from agent.config import CompressionSpec
from agent.federation.codec import accumulate_update


class FedAvgAccumulator:
    """Sample-weighted running sum of update vectors (local minus global parameters)."""

    def __init__(self, size: int, kernels: ModuleType) -> None:
        self.acc = np.zeros(size, dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0
        self._kernels = kernels

    def add_encoded(self, body: bytes, meta: dict[str, Any], weight: float,
                    spec: CompressionSpec) -> None:
        """Decode an update straight into the running sum (no float32 copy of it is made)."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        accumulate_update(self.acc, weight, body, meta, spec, self._kernels)
        self.total_weight += weight
        self.count += 1

    def apply(self, params: np.ndarray) -> np.ndarray:
        """New global parameters = old + weighted mean update."""
        if self.count == 0 or not (self.total_weight > 0 and math.isfinite(self.total_weight)):
            raise ValueError("no updates to aggregate")
        return (params + self.acc / np.float32(self.total_weight)).astype(np.float32)


def fedavg(params: np.ndarray, updates: Sequence[np.ndarray], weights: Sequence[float]
           ) -> np.ndarray:
    """Reference FedAvg (numpy, float64): the oracle the accumulator is tested against."""
    w = np.asarray(weights, dtype=np.float64)
    if len(updates) == 0 or len(updates) != len(w) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("need as many positive finite weights as updates")
    mean = sum(wi * u.astype(np.float64) for wi, u in zip(w, updates, strict=True)) / w.sum()
    return (params.astype(np.float64) + mean).astype(np.float32)

"""FedAvg as pure functions over flat vectors: updates in, new parameters out.

The coordinator streams: each update is folded into one accumulator frame by frame as its
chunks arrive, so memory grows with the model, never with sites x model. Weights are validated
before any math (total weight must be positive and finite).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from agent.config import CompressionSpec
from agent.errors import ProtocolError
from agent.federation.codec import UpdateStream


def _array_module(a: Any) -> ModuleType:
    """numpy, or cupy for a sum kept on a GPU."""
    return importlib.import_module(type(a).__module__.split(".")[0])


class WeightedSum:
    """A FrameSink that adds `weight` x each frame into `acc` (numpy, or cupy on the gpu
    backend); whole int8 frames may go to `holder` instead, to be summed with other sites'."""

    def __init__(self, acc: Any, weight: float, kernels: ModuleType,
                 holder: FedAvgAccumulator | None = None) -> None:
        self.acc, self.n = acc, acc.size
        self.weight = float(weight)
        self._kernels, self._holder = kernels, holder
        self._xp = _array_module(acc)

    def dense_int8(self, f: int, a: int, q: np.ndarray, scales: np.ndarray, block: int) -> None:
        if self._holder is not None:
            self._holder.hold(f, a, q, scales, self.weight)
        else:
            self._kernels.dequantize_accumulate(self.acc[a:a + q.size], q, scales, block,
                                                self.weight)

    def dense_f32(self, a: int, values: np.ndarray) -> None:
        self._kernels.weighted_accumulate(self.acc[a:a + values.size], values, self.weight)

    def sparse_int8(self, idx: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int
                    ) -> None:
        self._kernels.scatter_dequantize_accumulate(self.acc, self._xp.asarray(idx), q, scales,
                                                    block, self.weight)

    def sparse_f32(self, idx: np.ndarray, values: np.ndarray) -> None:
        self.acc[self._xp.asarray(idx)] += self._xp.asarray(np.float32(self.weight) * values)

    def ended(self) -> None:
        if self._holder is not None:
            self._holder.stream_ended()


class FedAvgAccumulator:
    """Sample-weighted running sum of update vectors (local minus global parameters).

    Updates arrive as `UpdateStream`s that add frame by frame. One that stops part way (the
    site went quiet, or a later frame was refused) has added whole frames only, up to its
    watermark; since those values cannot be taken back, the mean is taken per parameter over
    the updates that reached it: below every watermark all updates count, above a cut-off one
    it does not. With every update complete this is plain FedAvg. On the gpu backend the sum
    lives on the device and only the new parameters come back.

    Whole int8 frames (no top-k) are not summed one site at a time: a frame is held until
    every update still arriving has delivered its copy of that frame, then all copies go into
    the sum in one pass (`dequantize_accumulate_many`: 1 byte per site and 8 for the sum per
    parameter, instead of 9 per site). Held frames are capped at `HOLD_BYTES`, oldest summed
    first, so a slow site cannot make the coordinator hold everyone else's update.
    """

    HOLD_BYTES = 16 << 20

    def __init__(self, size: int, kernels: ModuleType) -> None:
        self._kernels = kernels
        self._gpu = kernels.__name__ == "kernels.gpu"
        if self._gpu:
            import cupy

            self.acc = cupy.zeros(size, dtype=cupy.float32)
        else:
            self.acc = np.zeros(size, dtype=np.float32)
        self.streams: list[tuple[str, UpdateStream, float]] = []
        self.closed = False
        self._held: dict[int, tuple[int, list[tuple[np.ndarray, np.ndarray, float]]]] = {}
        self._held_bytes = 0
        self._block = 0

    @property
    def total_weight(self) -> float:
        """Weight of the updates that arrived whole and well formed."""
        return sum(w for _, s, w in self.streams if s.accepted)

    @property
    def count(self) -> int:
        return sum(1 for _, s, _w in self.streams if s.accepted)

    def partial(self) -> dict[str, float]:
        """Updates that added part of themselves: site -> share of parameters settled."""
        return {label: s.watermark / s.n for label, s, _w in self.streams
                if not s.accepted and s.watermark > 0}

    def open_update(self, meta: dict[str, Any], weight: float, spec: CompressionSpec,
                    label: str = "", body_len: int | None = None) -> UpdateStream:
        """A stream that decodes one update into the sum as its body arrives."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        if self.closed:
            raise ProtocolError("round_closed")
        self._block = spec.block
        stream = UpdateStream(WeightedSum(self.acc, weight, self._kernels, self), meta, spec,
                              body_len)
        self.streams.append((label, stream, float(weight)))
        return stream

    # FrameHolder: whole int8 frames from the streams, summed several sites at a time

    def hold(self, f: int, a: int, q: np.ndarray, scales: np.ndarray, weight: float) -> None:
        self._held.setdefault(f, (a, []))[1].append((q, scales, weight))
        self._held_bytes += q.nbytes + scales.nbytes
        self._sum_ready()

    def stream_ended(self) -> None:
        self._sum_ready()

    def _sum_ready(self) -> None:
        live = [s for _, s, _w in self.streams if s.live]
        for f in sorted(self._held):
            if all(s.frame > f for s in live):  # no update still arriving lacks frame f
                self._sum_frame(f)
        while self._held_bytes > self.HOLD_BYTES:
            self._sum_frame(min(self._held))

    def _sum_frame(self, f: int) -> None:
        a, copies = self._held.pop(f)
        self._held_bytes -= sum(q.nbytes + s.nbytes for q, s, _ in copies)
        e = copies[0][0].size
        if len(copies) == 1:
            q, scales, w = copies[0]
            self._kernels.dequantize_accumulate(self.acc[a:a + e], q, scales, self._block, w)
            return
        self._kernels.dequantize_accumulate_many(
            self.acc[a:a + e], np.stack([c[0] for c in copies]),
            np.stack([c[1] for c in copies]), self._block,
            np.array([c[2] for c in copies], dtype=np.float32))

    def add_encoded(self, body: bytes, meta: dict[str, Any], weight: float,
                    spec: CompressionSpec, label: str = "") -> None:
        """Decode a whole update into the running sum (no float32 copy of it is made)."""
        stream = self.open_update(meta, weight, spec, label, len(body))
        stream.feed(body)
        stream.finish()

    def apply(self, params: np.ndarray) -> np.ndarray:
        """New global parameters = old + weighted mean update (per parameter over the updates
        that reached it); closes the sum to further frames."""
        self.closed = True
        for _, s, _w in self.streams:
            s.abandon(ProtocolError("round_closed"))
        while self._held:
            self._sum_frame(min(self._held))
        reached = [(s.watermark, w) for _, s, w in self.streams if s.watermark > 0]
        if not reached:
            raise ValueError("no updates to aggregate")
        acc = self.acc.get() if self._gpu else self.acc
        out = params.astype(np.float32, copy=True)
        lo = 0
        for hi in sorted({m for m, _ in reached}):
            total = sum(w for m, w in reached if m >= hi)  # arrival order, as FedAvg sums
            out[lo:hi] += acc[lo:hi] / np.float32(total)
            lo = hi
        return out


def accumulate_update(acc: np.ndarray, weight: float, body: bytes, meta: dict[str, Any],
                      spec: CompressionSpec, kernels: ModuleType) -> UpdateStream:
    """acc += weight * decoded update, the whole body at once (tests and simple callers);
    on a ProtocolError the sum holds whole frames only, up to the stream's watermark."""
    stream = UpdateStream(WeightedSum(acc, weight, kernels), meta, spec, len(body))
    stream.feed(body)
    stream.finish()
    return stream


def fedavg(params: np.ndarray, updates: Sequence[np.ndarray], weights: Sequence[float]
           ) -> np.ndarray:
    """Reference FedAvg (numpy, float64): the oracle the accumulator is tested against."""
    w = np.asarray(weights, dtype=np.float64)
    if len(updates) == 0 or len(updates) != len(w) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("need as many positive finite weights as updates")
    mean = sum(wi * u.astype(np.float64) for wi, u in zip(w, updates, strict=True)) / w.sum()
    return (params.astype(np.float64) + mean).astype(np.float32)

"""A model is a Layout: named tensors laid end to end over ONE flat float32 vector.

Training, compression, aggregation, masking and DP all work on the flat vector; layers read
views of it. A layout also travels on the wire (a site must train exactly the coordinator's
model), so `Layout.from_dict` treats its input as hostile and `Layout.digest` pins it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import ModelSpec
from agent.errors import ProtocolError

LAYOUT_VERSION = 1
MAX_PARAMS = 1 << 28  # 1 GiB of float32: far beyond a tabular model, small enough to allocate
MAX_TENSORS = 256
MAX_NDIM = 4
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
KINDS = ("logistic", "mlp")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: `shape` elements starting at `offset` in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Ordered tensors of one model kind, packed without gaps; validated on construction."""

    kind: str
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        _check_packing(self.tensors)
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r} (expected one of {KINDS})")
        _check_dense_chain(self)

    @property
    def size(self) -> int:
        """Number of float32 parameters in the flat vector."""
        last = self.tensors[-1]
        return last.offset + last.size

    @property
    def n_inputs(self) -> int:
        """Width of the feature vector the model reads."""
        return self.tensors[0].shape[0]

    def dense_layers(self) -> tuple[tuple[str, str], ...]:
        """(weight, bias) names in forward order; hidden layers are followed by ReLU."""
        if self.kind == "logistic":
            return (("w", "b"),)
        return tuple((f"dense{i}.w", f"dense{i}.b") for i in range(len(self.tensors) // 2))

    def views(self, params: np.ndarray) -> dict[str, np.ndarray]:
        """Name -> shaped view into `params` (no copy: writing a view writes `params`)."""
        if not isinstance(params, np.ndarray) or params.ndim != 1 or params.size != self.size:
            shape = getattr(params, "shape", None)
            raise ValueError(f"params must be a flat array of {self.size} values, got {shape}")
        if not params.flags.c_contiguous:
            raise ValueError("params must be C-contiguous so views are contiguous too")
        return {t.name: params[t.offset:t.offset + t.size].reshape(t.shape)
                for t in self.tensors}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data, inverse of `from_dict`."""
        return {
            "version": LAYOUT_VERSION,
            "kind": self.kind,
            "tensors": [{"name": t.name, "shape": list(t.shape), "offset": t.offset}
                        for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Layout:
        """Parse and validate a layout that may come from the wire.

        Raises ProtocolError("bad_layout", ...) on anything malformed.
        """
        try:
            return cls._parse(d)
        except (TypeError, ValueError) as exc:
            raise ProtocolError("bad_layout", str(exc)) from None

    @classmethod
    def _parse(cls, d: Any) -> Layout:
        if not isinstance(d, dict):
            raise TypeError(f"layout must be an object, got {type(d).__name__}")
        if set(d) != {"version", "kind", "tensors"}:
            keys = sorted(map(str, d))
            raise ValueError(f"layout keys must be version, kind, tensors; got {keys}")
        if _int(d["version"]) != LAYOUT_VERSION:
            raise ValueError(f"unsupported layout version {d['version']!r}")
        if not isinstance(d["kind"], str):
            raise TypeError("kind must be a string")
        raw = d["tensors"]
        if not isinstance(raw, list):
            raise TypeError("tensors must be a list")
        if len(raw) > MAX_TENSORS:
            raise ValueError(f"{len(raw)} tensors exceed the limit of {MAX_TENSORS}")
        tensors = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or set(item) != {"name", "shape", "offset"}:
                raise ValueError(f"tensors[{i}] must be an object with name, shape, offset")
            shape = item["shape"]
            if not isinstance(shape, list):
                raise TypeError(f"tensors[{i}].shape must be a list")
            tensors.append(TensorSpec(name=item["name"], shape=tuple(_int(s) for s in shape),
                                      offset=_int(item["offset"])))
        return cls(kind=d["kind"], tensors=tuple(tensors))

    def digest(self) -> str:
        """sha256 hex of the canonical JSON form: equal digests mean the same model shape."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("ascii")).hexdigest()


def _int(value: Any) -> int:
    """JSON integers only: no bools, floats or strings sneaking in as sizes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _check_packing(tensors: tuple[TensorSpec, ...]) -> None:
    """Names valid and unique, shapes positive, tensors back to back from offset 0, size bounded."""
    if not tensors:
        raise ValueError("a layout needs at least one tensor")
    seen: set[str] = set()
    end = 0
    for t in tensors:
        if not isinstance(t.name, str) or not NAME_PATTERN.fullmatch(t.name):
            raise ValueError(f"tensor name {t.name!r} does not match {NAME_PATTERN.pattern}")
        if t.name in seen:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        seen.add(t.name)
        if not 1 <= len(t.shape) <= MAX_NDIM or any(_int(s) < 1 for s in t.shape):
            raise ValueError(f"tensor {t.name!r} has invalid shape {t.shape}")
        if _int(t.offset) != end:
            raise ValueError(f"tensor {t.name!r} starts at {t.offset}, expected {end} (packed)")
        end += t.size
        if end > MAX_PARAMS:
            raise ValueError(f"layout exceeds {MAX_PARAMS} parameters")


def _check_dense_chain(layout: Layout) -> None:
    """Tensors must form the dense stack the model kind promises, ending in one logit."""
    names = [t.name for t in layout.tensors]
    expected = [n for pair in layout.dense_layers() for n in pair]
    if len(layout.tensors) % 2 or names != expected:
        raise ValueError(f"{layout.kind} layout must hold tensors {expected}, got {names}")
    if layout.kind == "mlp" and len(names) < 4:
        raise ValueError("an mlp layout needs a hidden layer and an output layer")
    shapes = {t.name: t.shape for t in layout.tensors}
    width = None
    for w, b in layout.dense_layers():
        ws, bs = shapes[w], shapes[b]
        if len(ws) != 2 or (width is not None and ws[0] != width) or bs != (ws[1],):
            raise ValueError(f"dense layer {w}{ws} / {b}{bs} does not chain")
        width = ws[1]
    if width != 1:
        raise ValueError(f"the last layer must output 1 logit, got {width}")


def build_layout(model: ModelSpec, n_inputs: int) -> Layout:
    """Layout of `model` reading `n_inputs` features: logistic (w, b) or an MLP of dense layers."""
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
        raise ValueError(f"n_inputs must be a positive integer, got {n_inputs!r}")
    if model.kind == "logistic":
        if model.hidden:
            raise ValueError("a logistic model has no hidden layers")
        named = [("w", (n_inputs, 1)), ("b", (1,))]
    elif model.kind == "mlp":
        if not model.hidden:
            raise ValueError("an mlp needs at least one hidden layer")
        widths = [n_inputs, *model.hidden, 1]
        named = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            named += [(f"dense{i}.w", (a, b)), (f"dense{i}.b", (b,))]
    else:
        raise ValueError(f"unknown model kind {model.kind!r}")
    tensors, offset = [], 0
    for name, shape in named:
        tensors.append(TensorSpec(name, shape, offset))
        offset += math.prod(shape)
    return Layout(kind=model.kind, tensors=tuple(tensors))


def init_params(layout: Layout, seed: int) -> np.ndarray:
    """Seeded initial parameters: He uniform before a ReLU, Glorot uniform otherwise, zero biases.

    He keeps ReLU activations from shrinking layer by layer; Glorot suits the linear output.
    """
    rng = np.random.default_rng(seed)
    params = np.zeros(layout.size, dtype=np.float32)
    views = layout.views(params)
    layers = layout.dense_layers()
    for i, (w, _b) in enumerate(layers):
        fan_in, fan_out = views[w].shape
        hidden = i < len(layers) - 1
        limit = math.sqrt(6.0 / fan_in) if hidden else math.sqrt(6.0 / (fan_in + fan_out))
        views[w][...] = rng.uniform(-limit, limit, size=(fan_in, fan_out))
    return params

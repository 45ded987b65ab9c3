"""A model is a Layout: named tensors laid end to end over ONE flat float32 vector.

Training, compression, aggregation, masking and DP all work on the flat vector; layers read
views of it. A layout also travels on the wire (a site must train exactly the coordinator's
model), so `Layout.from_dict` treats its input as hostile and `Layout.digest` pins it.

This module knows packing, views and the wire form; what tensors a kind holds, and how they
chain, is the kind's entry in `agent.learn.kinds`. A layout of a kind that reads images also
records the image shape (depth, h, w), which the tensor shapes alone do not pin down.
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
from agent.learn.kinds import ModelKind, model_kind

LAYOUT_VERSION = 1
MAX_PARAMS = 1 << 28  # 1 GiB of float32: far beyond a tabular model, small enough to allocate
MAX_TENSORS = 256
MAX_NDIM = 4
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
BASE_KEYS = ("version", "kind", "tensors")


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
    image_shape: tuple[int, int, int] | None = None  # (depth, h, w) for an imaging kind

    def __post_init__(self) -> None:
        _check_packing(self.tensors)
        entry = model_kind(self.kind)
        if not entry.reads_images and self.image_shape is not None:
            raise ValueError(f"a {self.kind} layout reads no image, so it has no image_shape")
        if entry.reads_images:
            _image_shape(self.image_shape)
        entry.check_layout(self)

    @property
    def model_kind(self) -> ModelKind:
        """This layout's entry in the model-kind registry."""
        return model_kind(self.kind)

    @property
    def size(self) -> int:
        """Number of float32 parameters in the flat vector."""
        last = self.tensors[-1]
        return last.offset + last.size

    @property
    def n_inputs(self) -> int:
        """Width of the clinical feature vector the model reads (besides any image)."""
        return self.model_kind.n_inputs(self)

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
        """Plain JSON-safe data, inverse of `from_dict` (tabular kinds carry no image keys, so
        their dicts and digests are what they were before imaging models existed)."""
        d: dict[str, Any] = {
            "version": LAYOUT_VERSION,
            "kind": self.kind,
            "tensors": [{"name": t.name, "shape": list(t.shape), "offset": t.offset}
                        for t in self.tensors],
        }
        if self.image_shape is not None:
            d["image_shape"] = list(self.image_shape)
        d.update(self.model_kind.wire_fields(self))
        return d

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
        if not isinstance(d.get("kind"), str):
            raise TypeError("kind must be a string")
        entry = model_kind(d["kind"])
        expected = [*BASE_KEYS, *(["image_shape"] if entry.reads_images else []),
                    *entry.wire_keys]
        if set(d) != set(expected):
            keys = sorted(map(str, d))
            raise ValueError(f"layout keys must be {', '.join(expected)}; got {keys}")
        if _int(d["version"]) != LAYOUT_VERSION:
            raise ValueError(f"unsupported layout version {d['version']!r}")
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
        image = None
        if entry.reads_images:
            raw_image = d["image_shape"]
            if not isinstance(raw_image, list) or len(raw_image) != 3:
                raise ValueError("image_shape must be a list of 3 integers [depth, h, w]")
            depth, h, w = (_int(s) for s in raw_image)
            image = (depth, h, w)
        layout = cls(kind=d["kind"], tensors=tuple(tensors), image_shape=image)
        for key, want in entry.wire_fields(layout).items():
            if _int(d[key]) != want:
                raise ValueError(f"{key} {d[key]} disagrees with the tensors ({want})")
        return layout

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


def _image_shape(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise ValueError(f"image_shape must be 3 integers (depth, h, w), got {value!r}")
    depth, h, w = value
    return depth, h, w


def build_layout(model: ModelSpec, n_inputs: int,
                 image_shape: tuple[int, int, int] | None = None) -> Layout:
    """Layout of `model` reading `n_inputs` clinical features (and, for a kind that reads
    images, an image of `image_shape` = (depth, size, size)), as its registry entry builds it.

    Raises ValueError on a spec the layout cannot hold (an image for a table model included).
    """
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
        raise ValueError(f"n_inputs must be a positive integer, got {n_inputs!r}")
    entry = model_kind(model.kind)
    if image_shape is not None:
        image_shape = _image_shape(image_shape)
    named = entry.tensors(model, n_inputs, image_shape)
    tensors, offset = [], 0
    for name, shape in named:
        if any(s < 1 for s in shape):
            raise ValueError(f"tensor {name} would have shape {shape}")
        tensors.append(TensorSpec(name, shape, offset))
        offset += math.prod(shape)
    return Layout(kind=model.kind, tensors=tuple(tensors), image_shape=image_shape)


def init_params(layout: Layout, seed: int) -> np.ndarray:
    """Seeded initial parameters, drawn as the layout's kind says (the same seed, the same
    model at every site and after every restart)."""
    rng = np.random.default_rng(seed)
    params = np.zeros(layout.size, dtype=np.float32)
    layout.model_kind.init(layout, rng, params)
    return params

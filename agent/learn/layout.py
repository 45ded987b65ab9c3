"""A model is a Layout: named tensors laid end to end over ONE flat float32 vector.

Training, compression, aggregation, masking and DP all work on the flat vector; layers read
views of it. A layout also travels on the wire (a site must train exactly the coordinator's
model), so `Layout.from_dict` treats its input as hostile and `Layout.digest` pins it.

Kinds: `logistic` (w, b), `mlp` (dense0..denseN) and `cnn_fused`: conv0..convM (each conv,
ReLU, 2x2 max-pool) over an image [depth, h, w] whose slices are the input channels, global
average pooling to c_last features, those concatenated (image features first) with the clinical
features, then the dense stack ending in one logit. A cnn layout also records its image shape
and kernel size, which the tensor shapes alone do not pin down.
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
KINDS = ("logistic", "mlp", "cnn_fused")
MAX_KERNEL = 15  # odd conv kernel side; the plan allows up to 7
MAX_IMAGE_DEPTH = 1024
MAX_IMAGE_SIDE = 4096


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
    image_shape: tuple[int, int, int] | None = None  # (depth, h, w) for cnn_fused, else None

    def __post_init__(self) -> None:
        _check_packing(self.tensors)
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r} (expected one of {KINDS})")
        if self.kind != "cnn_fused" and self.image_shape is not None:
            raise ValueError(f"a {self.kind} layout reads no image, so it has no image_shape")
        _check_dense_chain(self)  # names first: the conv checks below index by name
        if self.kind == "cnn_fused":
            _check_conv_stack(self)

    @property
    def size(self) -> int:
        """Number of float32 parameters in the flat vector."""
        last = self.tensors[-1]
        return last.offset + last.size

    @property
    def n_inputs(self) -> int:
        """Width of the clinical feature vector the model reads (besides any image)."""
        if self.kind == "cnn_fused":
            return self.tensors[2 * len(self.conv_layers())].shape[0] - self.image_features
        return self.tensors[0].shape[0]

    @property
    def image_features(self) -> int:
        """Channels of the last conv layer: the pooled image features fed to the dense stack."""
        layers = self.conv_layers()
        return self.tensors[2 * len(layers) - 1].shape[0] if layers else 0

    @property
    def kernel_size(self) -> int | None:
        """Side of every conv kernel (None when the model has no conv layers)."""
        return self.tensors[0].shape[-1] if self.conv_layers() else None

    def conv_layers(self) -> tuple[tuple[str, str], ...]:
        """(weight, bias) names of the conv layers in forward order (empty unless cnn_fused)."""
        if self.kind != "cnn_fused":
            return ()
        count = sum(1 for t in self.tensors if t.name.startswith("conv")) // 2
        return tuple((f"conv{i}.w", f"conv{i}.b") for i in range(count))

    def dense_layers(self) -> tuple[tuple[str, str], ...]:
        """(weight, bias) names in forward order; hidden layers are followed by ReLU."""
        if self.kind == "logistic":
            return (("w", "b"),)
        count = (len(self.tensors) - 2 * len(self.conv_layers())) // 2
        return tuple((f"dense{i}.w", f"dense{i}.b") for i in range(count))

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
            d["kernel_size"] = self.kernel_size
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
        expected = ["version", "kind", "tensors"]
        if d.get("kind") == "cnn_fused":
            expected += ["image_shape", "kernel_size"]
        if set(d) != set(expected):
            keys = sorted(map(str, d))
            raise ValueError(f"layout keys must be {', '.join(expected)}; got {keys}")
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
        if d["kind"] != "cnn_fused":
            return cls(kind=d["kind"], tensors=tuple(tensors))
        image = d["image_shape"]
        if not isinstance(image, list) or len(image) != 3:
            raise ValueError("image_shape must be a list of 3 integers [depth, h, w]")
        depth, h, w = (_int(s) for s in image)
        layout = cls(kind=d["kind"], tensors=tuple(tensors), image_shape=(depth, h, w))
        if _int(d["kernel_size"]) != layout.kernel_size:
            raise ValueError(f"kernel_size {d['kernel_size']} disagrees with the conv tensors "
                             f"({layout.kernel_size})")
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


def _check_conv_stack(layout: Layout) -> None:
    """cnn_fused: a sane image shape, conv layers chaining from `depth` channels with one odd
    kernel size, every pooling stage on even sides, and at least one clinical input."""
    image = layout.image_shape
    if not isinstance(image, tuple) or len(image) != 3:
        raise ValueError(f"a cnn_fused layout needs image_shape (depth, h, w), got {image!r}")
    depth, h, w = (_int(s) for s in image)
    if not (1 <= depth <= MAX_IMAGE_DEPTH and 1 <= h <= MAX_IMAGE_SIDE
            and 1 <= w <= MAX_IMAGE_SIDE):
        raise ValueError(f"image_shape {image} outside [1, {MAX_IMAGE_DEPTH}] x "
                         f"[1, {MAX_IMAGE_SIDE}]^2")
    convs = layout.conv_layers()
    if not convs:
        raise ValueError("a cnn_fused layout needs at least one conv layer")
    shapes = {t.name: t.shape for t in layout.tensors}
    channels, k = depth, layout.tensors[0].shape[-1]
    if not (k % 2 == 1 and k <= MAX_KERNEL):
        raise ValueError(f"conv kernel size must be odd and at most {MAX_KERNEL}, got {k}")
    for wname, bname in convs:
        ws, bs = shapes.get(wname), shapes.get(bname)
        if ws is None or bs is None or len(ws) != 4 or ws[1:] != (channels, k, k) \
                or bs != (ws[0],):
            raise ValueError(f"conv layer {wname}{ws} / {bname}{bs} does not chain from "
                             f"{channels} channels with kernel {k}")
        channels = ws[0]
    factor = 2 ** len(convs)
    if h % factor or w % factor:
        raise ValueError(f"image sides {h}x{w} must be divisible by {factor} "
                         f"(one 2x2 pooling per conv layer)")


def _check_dense_chain(layout: Layout) -> None:
    """Tensors must form the (conv and) dense stack the model kind promises, ending in one
    logit; a cnn's first dense layer reads the pooled image features plus >= 1 clinical one."""
    names = [t.name for t in layout.tensors]
    expected = [n for pair in layout.conv_layers() + layout.dense_layers() for n in pair]
    if len(layout.tensors) % 2 or names != expected:
        raise ValueError(f"{layout.kind} layout must hold tensors {expected}, got {names}")
    if layout.kind == "mlp" and len(names) < 4:
        raise ValueError("an mlp layout needs a hidden layer and an output layer")
    if not layout.dense_layers():
        raise ValueError(f"a {layout.kind} layout needs at least one dense layer")
    shapes = {t.name: t.shape for t in layout.tensors}
    width = None
    if layout.kind == "cnn_fused":
        first = shapes[layout.dense_layers()[0][0]]
        if len(first) != 2 or first[0] <= layout.image_features:
            raise ValueError(f"dense0.w{first} must read the {layout.image_features} image "
                             f"features plus at least one clinical input")
    for w, b in layout.dense_layers():
        ws, bs = shapes[w], shapes[b]
        if len(ws) != 2 or (width is not None and ws[0] != width) or bs != (ws[1],):
            raise ValueError(f"dense layer {w}{ws} / {b}{bs} does not chain")
        width = ws[1]
    if width != 1:
        raise ValueError(f"the last layer must output 1 logit, got {width}")


def _dense_named(widths: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    named: list[tuple[str, tuple[int, ...]]] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        named += [(f"dense{i}.w", (a, b)), (f"dense{i}.b", (b,))]
    return named


def _conv_named(model: ModelSpec, depth: int) -> list[tuple[str, tuple[int, ...]]]:
    k = model.kernel_size
    named: list[tuple[str, tuple[int, ...]]] = []
    channels = [depth, *model.conv_channels]
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        named += [(f"conv{i}.w", (b, a, k, k)), (f"conv{i}.b", (b,))]
    return named


def _image_shape(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise ValueError(f"image_shape must be 3 integers (depth, size, size), got {value!r}")
    depth, h, w = value
    return depth, h, w


def build_layout(model: ModelSpec, n_inputs: int,
                 image_shape: tuple[int, int, int] | None = None) -> Layout:
    """Layout of `model` reading `n_inputs` clinical features (and, for cnn_fused, an image of
    `image_shape` = (depth, size, size)): logistic (w, b), an MLP, or conv layers + dense stack.

    Raises ValueError on a spec the layout cannot hold (an image for a table model included).
    """
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
        raise ValueError(f"n_inputs must be a positive integer, got {n_inputs!r}")
    if model.kind != "cnn_fused" and (image_shape is not None or model.conv_channels):
        raise ValueError(f"a {model.kind} model reads no image: no image_shape or conv_channels")
    if model.kind == "logistic":
        if model.hidden:
            raise ValueError("a logistic model has no hidden layers")
        named = [("w", (n_inputs, 1)), ("b", (1,))]
    elif model.kind == "mlp":
        if not model.hidden:
            raise ValueError("an mlp needs at least one hidden layer")
        named = _dense_named([n_inputs, *model.hidden, 1])
    elif model.kind == "cnn_fused":
        if image_shape is None or not model.conv_channels:
            raise ValueError("a cnn_fused model needs image_shape and conv_channels")
        image_shape = _image_shape(image_shape)
        named = (_conv_named(model, image_shape[0])
                 + _dense_named([model.conv_channels[-1] + n_inputs, *model.hidden, 1]))
    else:
        raise ValueError(f"unknown model kind {model.kind!r}")
    tensors, offset = [], 0
    for name, shape in named:
        if any(s < 1 for s in shape):
            raise ValueError(f"tensor {name} would have shape {shape}")
        tensors.append(TensorSpec(name, shape, offset))
        offset += math.prod(shape)
    return Layout(kind=model.kind, tensors=tuple(tensors), image_shape=image_shape)


def init_params(layout: Layout, seed: int) -> np.ndarray:
    """Seeded initial parameters: He uniform before a ReLU, Glorot uniform otherwise, zero biases.

    He keeps ReLU activations from shrinking layer by layer; Glorot suits the linear output.
    Conv kernels (all followed by ReLU) are He uniform over fan_in = in_channels * k * k; they are
    drawn before the dense layers, so table models draw exactly what they always did.
    """
    rng = np.random.default_rng(seed)
    params = np.zeros(layout.size, dtype=np.float32)
    views = layout.views(params)
    for w, _b in layout.conv_layers():
        fan_in = math.prod(views[w].shape[1:])
        limit = math.sqrt(6.0 / fan_in)
        views[w][...] = rng.uniform(-limit, limit, size=views[w].shape)
    layers = layout.dense_layers()
    for i, (w, _b) in enumerate(layers):
        fan_in, fan_out = views[w].shape
        hidden = i < len(layers) - 1
        limit = math.sqrt(6.0 / fan_in) if hidden else math.sqrt(6.0 / (fan_in + fan_out))
        views[w][...] = rng.uniform(-limit, limit, size=(fan_in, fan_out))
    return params

"""The layer stack the built-in model kinds share: optional conv layers, then dense layers.

`logistic` is one dense layer (w, b); `mlp` is dense0..denseN with ReLU between; `cnn_fused`
runs conv0..convM (each conv, ReLU, 2x2 max-pool) over an image [depth, h, w] whose slices are
the input channels, global-average-pools to c_last features, puts those in front of the clinical
features and hands the row to the dense stack ending in one logit.

Pure functions of (layout, flat params, batch, kernel namespace): no state, no I/O, so the same
code runs on every kernel backend and a test can swap in `kernels.reference` with float64 arrays
for finite-difference checks. `agent.learn.kinds` wires them into the model-kind registry; no
other module needs to know a stack's tensor names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the layout module imports the registry, which imports this module
    from agent.learn.layout import Layout

MAX_KERNEL = 15  # odd conv kernel side; the plan allows up to 7
MAX_IMAGE_DEPTH = 1024
MAX_IMAGE_SIDE = 4096

Named = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ForwardConvention:
    """What the forward pass does that its tensor shapes do not say, in one place.

    The kernels (`kernels.ref_conv` and its Numba/CuPy twins) implement exactly this; the
    ONNX export (`agent.learn.onnx_export`) writes its graph from it, and
    tests/test_onnx_export.py pins both to it (kernel sizes 3 and 5, ties, fusion order)."""

    padding: str = "same"  # stride 1, k odd, k // 2 zeros on every side (symmetric)
    pool: int = 2  # max-pool window and stride after each conv's ReLU; no padding
    # Ties in a pooling window: the reference picks the first cell row-major, which only
    # routes the gradient; the forward value (the max) is the same whichever cell wins.
    pool_ties: str = "first cell in row-major order (forward value unaffected)"
    image_layout: str = "NCHW: [N, depth, h, w], the slices are the conv input channels"
    fusion: str = "globally average-pooled image features first, then the clinical columns"
    feature_order: str = "SavedModel.columns (agent.ingest.tables.encoded_columns order)"
    dense: str = "x @ w + b with w [in, out]; ReLU after every layer but the last"

    def pad(self, kernel: int) -> int:
        """Zeros added on each side so a stride-1 conv keeps the image size."""
        if self.padding != "same" or kernel % 2 == 0:
            raise ValueError(f"only 'same' padding with an odd kernel is defined, got {kernel}")
        return kernel // 2


FORWARD = ForwardConvention()


# ------------------------------------------------------------------ structure

def conv_layers(layout: Layout) -> tuple[tuple[str, str], ...]:
    """(weight, bias) names of the conv layers in forward order (empty for table models)."""
    count = sum(1 for t in layout.tensors if t.name.startswith("conv")) // 2
    return tuple((f"conv{i}.w", f"conv{i}.b") for i in range(count))


def dense_layers(layout: Layout) -> tuple[tuple[str, str], ...]:
    """(weight, bias) names in forward order; hidden layers are followed by ReLU."""
    if layout.tensors[0].name == "w":
        return (("w", "b"),)
    count = (len(layout.tensors) - 2 * len(conv_layers(layout))) // 2
    return tuple((f"dense{i}.w", f"dense{i}.b") for i in range(count))


def image_features(layout: Layout) -> int:
    """Channels of the last conv layer: the pooled image features fed to the dense stack."""
    layers = conv_layers(layout)
    return layout.tensors[2 * len(layers) - 1].shape[0] if layers else 0


def kernel_size(layout: Layout) -> int | None:
    """Side of every conv kernel (None when the model has no conv layers)."""
    return layout.tensors[0].shape[-1] if conv_layers(layout) else None


def n_inputs(layout: Layout) -> int:
    """Clinical features the first dense layer reads besides the pooled image features."""
    first = layout.tensors[2 * len(conv_layers(layout))]
    return first.shape[0] - image_features(layout)


def dense_named(widths: list[int]) -> Named:
    """dense0.w/b .. for layer widths [in, hidden..., 1]."""
    named: Named = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        named += [(f"dense{i}.w", (a, b)), (f"dense{i}.b", (b,))]
    return named


def conv_named(channels: list[int], k: int) -> Named:
    """conv0.w/b .. chaining `channels` = [depth, c0, c1, ...] with k x k kernels."""
    named: Named = []
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        named += [(f"conv{i}.w", (b, a, k, k)), (f"conv{i}.b", (b,))]
    return named


def check_dense_chain(layout: Layout, *, min_layers: int = 1) -> None:
    """Tensors must form the (conv and) dense stack, ending in one logit; a cnn's first dense
    layer reads the pooled image features plus >= 1 clinical one."""
    names = [t.name for t in layout.tensors]
    expected = [n for pair in conv_layers(layout) + dense_layers(layout) for n in pair]
    if len(layout.tensors) % 2 or names != expected:
        raise ValueError(f"{layout.kind} layout must hold tensors {expected}, got {names}")
    if len(dense_layers(layout)) < min_layers:
        raise ValueError(f"a {layout.kind} layout needs at least {min_layers} dense layer(s)"
                         + (" (a hidden layer and an output layer)" if min_layers > 1 else ""))
    shapes = {t.name: t.shape for t in layout.tensors}
    if conv_layers(layout):
        first = shapes[dense_layers(layout)[0][0]]
        if len(first) != 2 or first[0] <= image_features(layout):
            raise ValueError(f"dense0.w{first} must read the {image_features(layout)} image "
                             f"features plus at least one clinical input")
    width = None
    for w, b in dense_layers(layout):
        ws, bs = shapes[w], shapes[b]
        if len(ws) != 2 or (width is not None and ws[0] != width) or bs != (ws[1],):
            raise ValueError(f"dense layer {w}{ws} / {b}{bs} does not chain")
        width = ws[1]
    if width != 1:
        raise ValueError(f"the last layer must output 1 logit, got {width}")


def check_conv_stack(layout: Layout) -> None:
    """A sane image shape, conv layers chaining from `depth` channels with one odd kernel size,
    and every pooling stage on even sides."""
    image = layout.image_shape
    if not isinstance(image, tuple) or len(image) != 3:
        raise ValueError(f"a {layout.kind} layout needs image_shape (depth, h, w), got {image!r}")
    depth, h, w = image
    if not (1 <= depth <= MAX_IMAGE_DEPTH and 1 <= h <= MAX_IMAGE_SIDE
            and 1 <= w <= MAX_IMAGE_SIDE):
        raise ValueError(f"image_shape {image} outside [1, {MAX_IMAGE_DEPTH}] x "
                         f"[1, {MAX_IMAGE_SIDE}]^2")
    convs = conv_layers(layout)
    if not convs:
        raise ValueError(f"a {layout.kind} layout needs at least one conv layer")
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
    factor = FORWARD.pool ** len(convs)
    if h % factor or w % factor:
        raise ValueError(f"image sides {h}x{w} must be divisible by {factor} (one "
                         f"{FORWARD.pool}x{FORWARD.pool} pooling per conv layer)")


def init_stack(layout: Layout, rng: np.random.Generator, params: np.ndarray) -> None:
    """He uniform before a ReLU, Glorot uniform otherwise, zero biases (params arrives zeroed).

    He keeps ReLU activations from shrinking layer by layer; Glorot suits the linear output.
    Conv kernels (all followed by ReLU) are He uniform over fan_in = in_channels * k * k; they are
    drawn before the dense layers, so table models draw exactly what they always did.
    """
    views = layout.views(params)
    for w, _b in conv_layers(layout):
        fan_in = math.prod(views[w].shape[1:])
        limit = math.sqrt(6.0 / fan_in)
        views[w][...] = rng.uniform(-limit, limit, size=views[w].shape)
    layers = dense_layers(layout)
    for i, (w, _b) in enumerate(layers):
        fan_in, fan_out = views[w].shape
        hidden = i < len(layers) - 1
        limit = math.sqrt(6.0 / fan_in) if hidden else math.sqrt(6.0 / (fan_in + fan_out))
        views[w][...] = rng.uniform(-limit, limit, size=(fan_in, fan_out))


# ------------------------------------------------------------------ forward and backward

@dataclass
class _ConvTape:
    """What the conv stack's backward pass needs from its forward pass, per layer."""

    inputs: list[np.ndarray]  # each conv layer's input
    pre: list[np.ndarray]  # each conv layer's output before ReLU
    argmax: list[np.ndarray]  # each max-pool's winning cells
    last_shape: tuple[int, ...]  # shape of the last pooled map (the global pool's input)


def _image_forward(layout: Layout, views: dict[str, np.ndarray], images: np.ndarray,
                   kernels: ModuleType) -> tuple[np.ndarray, _ConvTape]:
    """Pooled image features [n, c_last] plus the tape for backward."""
    tape = _ConvTape([], [], [], ())
    a = np.ascontiguousarray(images)
    for w, b in conv_layers(layout):
        tape.inputs.append(a)
        z = kernels.conv2d_forward(a, views[w], views[b])
        tape.pre.append(z)
        a, arg = kernels.maxpool2_forward(kernels.relu_forward(z))
        tape.argmax.append(arg)
    tape.last_shape = a.shape
    return kernels.global_avgpool_forward(a), tape


def _image_backward(layout: Layout, views: dict[str, np.ndarray],
                    gviews: dict[str, np.ndarray], tape: _ConvTape, dfeat: np.ndarray,
                    kernels: ModuleType) -> None:
    """Write the conv tensors' gradients into gviews, from d(loss)/d(pooled features)."""
    da = kernels.global_avgpool_backward(np.ascontiguousarray(dfeat), tape.last_shape)
    convs = conv_layers(layout)
    for i in range(len(convs) - 1, -1, -1):
        w, b = convs[i]
        dr = kernels.maxpool2_backward(da, tape.argmax[i], tape.pre[i].shape)
        dz = kernels.relu_backward(tape.pre[i], dr)
        da, dw, db = kernels.conv2d_backward(tape.inputs[i], views[w], dz)
        gviews[w][...] = dw
        gviews[b][...] = db


def _forward(layout: Layout, params: np.ndarray, x: np.ndarray, kernels: ModuleType,
             images: np.ndarray | None = None
             ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], _ConvTape | None]:
    """Logits[n] plus each dense layer's input and each hidden pre-activation (and the conv
    tape for an imaging model), kept for backward."""
    views = layout.views(params)
    layers = dense_layers(layout)
    inputs: list[np.ndarray] = []
    pre: list[np.ndarray] = []
    tape = None
    a = np.ascontiguousarray(x)
    if images is not None:
        feats, tape = _image_forward(layout, views, images, kernels)
        a = np.concatenate([feats, a], axis=1)
    for i, (w, b) in enumerate(layers):
        inputs.append(a)
        z = kernels.dense_forward(a, views[w], views[b])
        if i < len(layers) - 1:
            pre.append(z)
            a = kernels.relu_forward(z)
    return z.reshape(-1), inputs, pre, tape


def loss_and_grad(layout: Layout, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                  kernels: ModuleType,
                  images: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy and its gradient as one flat vector shaped like params."""
    logits, inputs, pre, tape = _forward(layout, params, x, kernels, images)
    loss, dz = kernels.bce_with_logits(logits, np.ascontiguousarray(y))
    views = layout.views(params)
    grad = np.empty_like(params)  # every element is written: the layers cover the layout
    gviews = layout.views(grad)
    dy = dz.reshape(-1, 1)
    layers = dense_layers(layout)
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i]
        dx, dw, db = kernels.dense_backward(inputs[i], views[w], dy)
        gviews[w][...] = dw
        gviews[b][...] = db
        if i > 0:
            dy = kernels.relu_backward(pre[i - 1], dx)
    if tape is not None:
        _image_backward(layout, views, gviews, tape, dx[:, :image_features(layout)], kernels)
    return float(loss), grad


def predict_proba(layout: Layout, params: np.ndarray, x: np.ndarray, kernels: ModuleType,
                  images: np.ndarray | None = None) -> np.ndarray:
    """P(outcome = 1) for each row of x (and its image, for cnn_fused), in params' dtype."""
    logits, _, _, _ = _forward(layout, params, x, kernels, images)
    return kernels.sigmoid(np.ascontiguousarray(logits))

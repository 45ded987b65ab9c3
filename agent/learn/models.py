"""Forward and backward passes of a layout's model, for a binary outcome.

Pure functions of (layout, flat params, batch, kernel namespace): no state, no I/O, so the same
code runs on every kernel backend and a test can swap in `kernels.reference` with float64 arrays
for finite-difference checks. The gradient comes back as one flat vector shaped like params, which
is what the optimizer kernels and the federation code consume.

A cnn_fused model runs its conv stack (conv, ReLU, 2x2 max-pool per layer) on the image, global
average pools to one feature per channel, puts those features in front of the clinical ones and
hands the row to the same dense stack the table models use; backward splits the dense stack's
input gradient the same way and walks the conv stack back.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from agent.learn.layout import Layout


def _check_batch(layout: Layout, params: np.ndarray, x: np.ndarray,
                 y: np.ndarray | None = None, images: np.ndarray | None = None) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != layout.n_inputs:
        raise ValueError(f"x must have shape (n, {layout.n_inputs}), got "
                         f"{getattr(x, 'shape', None)}")
    if y is not None and x.shape[0] == 0:
        raise ValueError("x has no rows: a mean loss over nothing is undefined")
    if x.dtype != params.dtype:
        raise TypeError(f"x is {x.dtype} but params are {params.dtype}")
    if y is not None and (not isinstance(y, np.ndarray) or y.shape != (x.shape[0],)
                          or y.dtype != params.dtype):
        raise ValueError(f"y must be {params.dtype} of shape ({x.shape[0]},), got "
                         f"{getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}")
    if layout.image_shape is None:
        if images is not None:
            raise ValueError(f"a {layout.kind} model reads no images, but images were given")
        return
    want = (x.shape[0], *layout.image_shape)
    if not isinstance(images, np.ndarray) or images.shape != want \
            or images.dtype != params.dtype:
        raise ValueError(f"a {layout.kind} model needs images of {params.dtype} and shape "
                         f"{want}, got {getattr(images, 'dtype', None)} "
                         f"{getattr(images, 'shape', None)}")


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
    for w, b in layout.conv_layers():
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
    for i in range(len(layout.conv_layers()) - 1, -1, -1):
        w, b = layout.conv_layers()[i]
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
    layers = layout.dense_layers()
    inputs: list[np.ndarray] = []
    pre: list[np.ndarray] = []
    tape = None
    a = np.ascontiguousarray(x)
    if layout.image_shape is not None:
        assert images is not None  # _check_batch guarantees it
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
    """Mean binary cross-entropy of the model on (x, y) and its gradient as a flat vector.

    y holds 0/1 outcomes in the same float dtype as params; grad has params' dtype and layout.
    `images` [n, depth, h, w] (params' dtype) is required by cnn_fused and refused otherwise.
    """
    _check_batch(layout, params, x, y, images)
    logits, inputs, pre, tape = _forward(layout, params, x, kernels, images)
    loss, dz = kernels.bce_with_logits(logits, np.ascontiguousarray(y))
    views = layout.views(params)
    grad = np.empty_like(params)  # every element is written: the layers cover the layout
    gviews = layout.views(grad)
    dy = dz.reshape(-1, 1)
    layers = layout.dense_layers()
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i]
        dx, dw, db = kernels.dense_backward(inputs[i], views[w], dy)
        gviews[w][...] = dw
        gviews[b][...] = db
        if i > 0:
            dy = kernels.relu_backward(pre[i - 1], dx)
    if tape is not None:
        _image_backward(layout, views, gviews, tape, dx[:, :layout.image_features], kernels)
    return float(loss), grad


def predict_proba(layout: Layout, params: np.ndarray, x: np.ndarray, kernels: ModuleType,
                  images: np.ndarray | None = None) -> np.ndarray:
    """P(outcome = 1) for each row of x (and its image, for cnn_fused), in params' dtype."""
    _check_batch(layout, params, x, images=images)
    logits, _, _, _ = _forward(layout, params, x, kernels, images)
    return kernels.sigmoid(np.ascontiguousarray(logits))

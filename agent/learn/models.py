"""Forward and backward passes of the layout's dense stack, for a binary outcome.

Pure functions of (layout, flat params, batch, kernel namespace): no state, no I/O, so the same
code runs on every kernel backend and a test can swap in `kernels.reference` with float64 arrays
for finite-difference checks. The gradient comes back as one flat vector shaped like params, which
is what the optimizer kernels and the federation code consume.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from agent.learn.layout import Layout


def _check_batch(layout: Layout, params: np.ndarray, x: np.ndarray,
                 y: np.ndarray | None = None) -> None:
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


def _forward(layout: Layout, params: np.ndarray, x: np.ndarray,
             kernels: ModuleType) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Logits[n] plus each layer's input and each hidden pre-activation, kept for backward."""
    views = layout.views(params)
    layers = layout.dense_layers()
    inputs: list[np.ndarray] = []
    pre: list[np.ndarray] = []
    a = np.ascontiguousarray(x)
    for i, (w, b) in enumerate(layers):
        inputs.append(a)
        z = kernels.dense_forward(a, views[w], views[b])
        if i < len(layers) - 1:
            pre.append(z)
            a = kernels.relu_forward(z)
    return z.reshape(-1), inputs, pre


def loss_and_grad(layout: Layout, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                  kernels: ModuleType) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy of the model on (x, y) and its gradient as a flat vector.

    y holds 0/1 outcomes in the same float dtype as params; grad has params' dtype and layout.
    """
    _check_batch(layout, params, x, y)
    logits, inputs, pre = _forward(layout, params, x, kernels)
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
    return float(loss), grad


def predict_proba(layout: Layout, params: np.ndarray, x: np.ndarray,
                  kernels: ModuleType) -> np.ndarray:
    """P(outcome = 1) for each row of x, in params' dtype (float32 in production)."""
    _check_batch(layout, params, x)
    logits, _, _ = _forward(layout, params, x, kernels)
    return kernels.sigmoid(np.ascontiguousarray(logits))

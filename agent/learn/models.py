"""Forward and backward passes of a layout's model, for a binary outcome.

The batch is checked here, once for every kind, and the pass is the kind's (its entry in
`agent.learn.kinds`; the built-in kinds share `agent.learn.stack`). Pure functions of (layout,
flat params, batch, kernel namespace): the same code runs on every kernel backend, and a test
can pass `kernels.reference` with float64 arrays for finite-difference checks. The gradient
comes back as one flat vector shaped like params, which is what the optimizer kernels and the
federation code consume.
"""

from __future__ import annotations

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


def loss_and_grad(layout: Layout, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                  kernels: ModuleType,
                  images: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy of the model on (x, y) and its gradient as a flat vector.

    y holds 0/1 outcomes in the same float dtype as params; grad has params' dtype and layout.
    `images` [n, depth, h, w] (params' dtype) is required by an imaging kind, refused otherwise.
    """
    _check_batch(layout, params, x, y, images)
    return layout.model_kind.loss_and_grad(layout, params, x, y, kernels, images)


def predict_proba(layout: Layout, params: np.ndarray, x: np.ndarray, kernels: ModuleType,
                  images: np.ndarray | None = None) -> np.ndarray:
    """P(outcome = 1) for each row of x (and its image, for an imaging kind), in params' dtype."""
    _check_batch(layout, params, x, images=images)
    return layout.model_kind.predict_proba(layout, params, x, kernels, images)

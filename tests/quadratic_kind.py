"""A model kind that fedsilo does not ship, registered the one way a new kind is added.

`quadratic`: logit = x.w + (x*x).v + b, a logistic model that can also bend. A package names
QUADRATIC under the `fedsilo.model_kinds` entry-point group (the tests write such a package's
metadata) or code calls `register_kind(QUADRATIC)`; nothing in fedsilo is edited. Written
with plain numpy (kernels only for the loss), as a data scientist would write a first version.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from agent.learn.kinds import ModelKind

NAME = "quadratic"


def _plan_problem(model, imaging):
    if model.hidden or model.conv_channels:
        return "model.hidden", "a quadratic model has no hidden or conv layers"
    return None


def _tensors(model, n_inputs, image_shape):
    if image_shape is not None or model.hidden or model.conv_channels:
        raise ValueError("a quadratic model reads the clinical table only")
    return [("w", (n_inputs, 1)), ("v", (n_inputs, 1)), ("b", (1,))]


def _check(layout):
    names = [t.name for t in layout.tensors]
    shapes = [t.shape for t in layout.tensors]
    if names != ["w", "v", "b"] or shapes[0] != shapes[1] or shapes[0][1:] != (1,) \
            or shapes[2] != (1,):
        raise ValueError(f"a quadratic layout holds w[n,1], v[n,1], b[1]; got "
                         f"{list(zip(names, shapes, strict=True))}")


def _init(layout, rng, params):
    views = layout.views(params)
    limit = np.sqrt(6.0 / (views["w"].shape[0] + 1))
    views["w"][...] = rng.uniform(-limit, limit, size=views["w"].shape)


def _logits(layout, params, x):
    v = layout.views(params)
    return (x @ v["w"] + (x * x) @ v["v"] + v["b"]).reshape(-1)


def _loss_and_grad(layout, params, x, y, kernels: ModuleType, images=None):
    loss, dz = kernels.bce_with_logits(np.ascontiguousarray(_logits(layout, params, x)), y)
    grad = np.empty_like(params)
    g = layout.views(grad)
    g["w"][...] = x.T @ dz[:, None]
    g["v"][...] = (x * x).T @ dz[:, None]
    g["b"][...] = dz.sum()
    return float(loss), grad


def _predict(layout, params, x, kernels: ModuleType, images=None):
    return kernels.sigmoid(np.ascontiguousarray(_logits(layout, params, x)))


QUADRATIC = ModelKind(
    name=NAME, summary="logistic regression on the features and their squares",
    reads_images=False, plan_problem=_plan_problem, tensors=_tensors, check_layout=_check,
    n_inputs=lambda layout: layout.tensors[0].shape[0], init=_init,
    loss_and_grad=_loss_and_grad, predict_proba=_predict)

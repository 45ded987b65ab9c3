"""Plain-numpy kernels: the oracle every other backend is tested against.

Design: one function per kernel, written as the textbook formula over whole arrays, slow and
obviously right. Inputs are C-contiguous float arrays; unlike the fast backends this one also
accepts float64 (outputs keep the input dtype) so gradient checks can run in double precision.
Shapes are checked up front because numpy broadcasting would otherwise hide a wrong shape.
Losses return (mean loss as a Python float accumulated in float64, gradient already divided by n).
"""

from __future__ import annotations

import numpy as np

from kernels.ref_checks import check_float as _check


def _same_shape(names: str, *arrays: np.ndarray) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{names} must have the same shape, got {[a.shape for a in arrays]}")


def _labels(labels: np.ndarray, n: int, k: int) -> None:
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (n,):
        raise TypeError(f"labels must be int64 of shape ({n},)")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k})")


# ---------------------------------------------------------------------------- dense layer


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = x @ w + b for a batch x[n, i], weights w[i, o], bias b[o]."""
    _check("x", x, 2)
    _check("w", w, 2, x.dtype)
    _check("b", b, 1, x.dtype)
    if x.shape[1] != w.shape[0] or b.shape[0] != w.shape[1]:
        raise ValueError(f"shapes x{x.shape} w{w.shape} b{b.shape} do not chain")
    return x @ w + b


def dense_backward(x: np.ndarray, w: np.ndarray,
                   dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of y = x @ w + b: dx = dy @ w.T, dw = x.T @ dy, db = sum of dy over rows."""
    _check("x", x, 2)
    _check("w", w, 2, x.dtype)
    _check("dy", dy, 2, x.dtype)
    if x.shape[1] != w.shape[0] or dy.shape != (x.shape[0], w.shape[1]):
        raise ValueError(f"shapes x{x.shape} w{w.shape} dy{dy.shape} do not chain")
    return dy @ w.T, x.T @ dy, dy.sum(axis=0)


# ---------------------------------------------------------------------------- activations


def relu_forward(z: np.ndarray) -> np.ndarray:
    """a = max(z, 0), any shape."""
    _check("z", z)
    return np.maximum(z, 0)


def relu_backward(z: np.ndarray, da: np.ndarray) -> np.ndarray:
    """dz = da where z > 0 else 0 (the subgradient at 0 is taken as 0)."""
    _check("z", z)
    _check("da", da, dtype=z.dtype)
    _same_shape("z and da", z, da)
    return np.where(z > 0, da, np.zeros_like(da))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) via exp(-|z|), which never overflows (|z| up to 1e4 and beyond)."""
    _check("z", z)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


# ---------------------------------------------------------------------------- losses


def bce_with_logits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy on logits: max(z,0) - z*y + log1p(exp(-|z|)); dz = (p-y)/n."""
    _check("z", z, 1)
    _check("y", y, 1, z.dtype)
    _same_shape("z and y", z, y)
    n = z.shape[0]
    z64, y64 = z.astype(np.float64), y.astype(np.float64)
    per = np.maximum(z64, 0) - z64 * y64 + np.log1p(np.exp(-np.abs(z64)))
    loss = float(per.mean()) if n else 0.0
    dz = (sigmoid(z) - y) / max(n, 1)
    return loss, dz.astype(z.dtype, copy=False)


def softmax_cross_entropy(z: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean categorical cross-entropy on logits z[n, k]; dz = (softmax(z) - onehot) / n.

    Subtracting each row's max before exp keeps it finite for any logits.
    """
    _check("z", z, 2)
    n, k = z.shape
    _labels(labels, n, k)
    s = z - z.max(axis=1, keepdims=True)
    e = np.exp(s)
    total = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    per = np.log(total[:, 0].astype(np.float64)) - s[rows, labels].astype(np.float64)
    loss = float(per.mean()) if n else 0.0
    dz = e / total
    dz[rows, labels] -= 1
    return loss, (dz / max(n, 1)).astype(z.dtype, copy=False)


# ---------------------------------------------------------------------------- optimizers


def sgd_momentum_step(params: np.ndarray, grad: np.ndarray, velocity: np.ndarray, lr: float,
                      momentum: float, weight_decay: float) -> None:
    """In place: v = momentum*v + grad + wd*params; params -= lr*v (momentum 0 is plain SGD)."""
    _check("params", params, 1)
    _check("grad", grad, 1, params.dtype)
    _check("velocity", velocity, 1, params.dtype)
    _same_shape("params, grad and velocity", params, grad, velocity)
    t = params.dtype.type
    velocity *= t(momentum)
    velocity += grad + t(weight_decay) * params
    params -= t(lr) * velocity


def add_proximal(grad: np.ndarray, params: np.ndarray, anchor: np.ndarray, mu: float) -> None:
    """In place: grad += mu * (params - anchor), FedProx's proximal term (Li et al., MLSys
    2020): it pulls local training towards the global model `anchor` the round started from."""
    _check("grad", grad, 1)
    _check("params", params, 1, grad.dtype)
    _check("anchor", anchor, 1, grad.dtype)
    _same_shape("grad, params and anchor", grad, params, anchor)
    grad += grad.dtype.type(mu) * (params - anchor)


def adam_step(params: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float,
              beta1: float, beta2: float, eps: float, t: int, weight_decay: float) -> None:
    """In place Adam with bias correction (t counts steps from 1) and L2 weight decay.

    g = grad + wd*params; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    params -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
    """
    _check("params", params, 1)
    for name, a in (("grad", grad), ("m", m), ("v", v)):
        _check(name, a, 1, params.dtype)
    _same_shape("params, grad, m and v", params, grad, m, v)
    if t < 1:
        raise ValueError(f"t counts steps from 1, got {t}")
    f = params.dtype.type
    c1, c2 = f(1.0 - beta1 ** t), f(1.0 - beta2 ** t)
    g = grad + f(weight_decay) * params
    m *= f(beta1)
    m += f(1.0 - beta1) * g
    v *= f(beta2)
    v += f(1.0 - beta2) * (g * g)
    params -= f(lr) * (m / c1) / (np.sqrt(v / c2) + f(eps))


# ---------------------------------------------------------------------------- aggregation


def weighted_accumulate(acc: np.ndarray, x: np.ndarray, weight: float) -> None:
    """In place acc += weight * x: the FedAvg inner loop."""
    _check("acc", acc, 1)
    _check("x", x, 1, acc.dtype)
    _same_shape("acc and x", acc, x)
    acc += acc.dtype.type(weight) * x


# ---------------------------------------------------------------------------- by concern
# Imaging and conv kernels live in their own modules; the backend namespace
# re-exports them so callers see one flat set of kernel names.
from kernels.ref_codec import (  # noqa: E402, F401
    dequantize_accumulate,
    dequantize_accumulate_many,
    dequantize_int8,
    quantize_int8,
    scatter_dequantize_accumulate,
    topk_indices,
)
from kernels.ref_conv import (  # noqa: E402, F401
    conv2d_backward,
    conv2d_forward,
    global_avgpool_backward,
    global_avgpool_forward,
    maxpool2_backward,
    maxpool2_forward,
)
from kernels.ref_imaging import preprocess_slice, resample_depth  # noqa: E402, F401
from kernels.ref_privacy import clip_rows_sum, mask_accumulate  # noqa: E402, F401
from kernels.ref_robust import (  # noqa: E402, F401
    clip_to_norm,
    coordinate_median,
    l2_norms,
    pairwise_sq_distances,
    trimmed_mean,
)

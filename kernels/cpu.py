"""Numba kernels: the same functions and signatures as `kernels.reference`, compiled.

Design, layered like scikit-learn's `_loss`: a per-row or per-element `@njit` helper holds the
math once; a serial loop and (where it pays) a `prange` loop call it; a Python facade checks
dtype/shape, allocates outputs, casts scalars to float32 and picks serial or parallel by the work
size (`PARALLEL_MIN_WORK`). Only float32 C-contiguous arrays are accepted, so each kernel compiles
exactly one signature, which `fedsilo warm-cache` fills into the on-disk cache (`cache=True`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kernels.cpu_jit import F32 as _F32
from kernels.cpu_jit import jit as _jit
from kernels.cpu_jit import parallel as _parallel
from kernels.cpu_jit import pjit as _pjit
from kernels.ref_checks import check_f32 as _f32
from kernels.reference import _labels, _same_shape

# Below this many multiply-adds (dense) or elements (steps), thread start-up costs more than it
# saves. Tests set it to 0 to run the parallel loops on small inputs.
PARALLEL_MIN_WORK = 1 << 16


# ---------------------------------------------------------------------------- dense layer


@_jit
def _dense_row(x, w, b, y, r):  # pragma: no cover - compiled
    ni, no = w.shape
    for j in range(no):
        y[r, j] = b[j]
    for k in range(ni):
        xv = x[r, k]
        for j in range(no):
            y[r, j] += xv * w[k, j]


@_jit
def _dense_forward_serial(x, w, b, y):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        _dense_row(x, w, b, y, r)


@_pjit
def _dense_forward_parallel(x, w, b, y):  # pragma: no cover - compiled
    for r in prange(x.shape[0]):
        _dense_row(x, w, b, y, r)


@_jit
def _dx_row(w, dy, dx, r):  # pragma: no cover - compiled
    ni, no = w.shape
    for k in range(ni):
        s = _F32(0.0)
        for j in range(no):
            s += dy[r, j] * w[k, j]
        dx[r, k] = s


@_jit
def _dw_row(x, dy, dw, k):  # pragma: no cover - compiled
    no = dw.shape[1]
    for j in range(no):
        dw[k, j] = 0.0
    for r in range(x.shape[0]):
        xv = x[r, k]
        for j in range(no):
            dw[k, j] += xv * dy[r, j]


@_jit
def _db(dy, db):  # pragma: no cover - compiled
    for j in range(dy.shape[1]):
        db[j] = 0.0
    for r in range(dy.shape[0]):
        for j in range(dy.shape[1]):
            db[j] += dy[r, j]


@_jit
def _dense_backward_serial(x, w, dy, dx, dw, db):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        _dx_row(w, dy, dx, r)
    for k in range(w.shape[0]):
        _dw_row(x, dy, dw, k)
    _db(dy, db)


@_pjit
def _dense_backward_parallel(x, w, dy, dx, dw, db):  # pragma: no cover - compiled
    for r in prange(x.shape[0]):
        _dx_row(w, dy, dx, r)
    for k in prange(w.shape[0]):
        _dw_row(x, dy, dw, k)
    _db(dy, db)


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = x @ w + b; rows run in parallel for large batches."""
    _f32("x", x, 2)
    _f32("w", w, 2)
    _f32("b", b, 1)
    if x.shape[1] != w.shape[0] or b.shape[0] != w.shape[1]:
        raise ValueError(f"shapes x{x.shape} w{w.shape} b{b.shape} do not chain")
    y = np.empty((x.shape[0], w.shape[1]), dtype=_F32)
    kernel = _dense_forward_parallel if _parallel(x.size * w.shape[1]) else _dense_forward_serial
    kernel(x, w, b, y)
    return y


def dense_backward(x: np.ndarray, w: np.ndarray,
                   dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dw, db) of y = x @ w + b; dx rows and dw rows run in parallel for large batches."""
    _f32("x", x, 2)
    _f32("w", w, 2)
    _f32("dy", dy, 2)
    if x.shape[1] != w.shape[0] or dy.shape != (x.shape[0], w.shape[1]):
        raise ValueError(f"shapes x{x.shape} w{w.shape} dy{dy.shape} do not chain")
    dx = np.empty_like(x)
    dw = np.empty_like(w)
    db = np.empty(w.shape[1], dtype=_F32)
    big = _parallel(x.size * w.shape[1])
    (_dense_backward_parallel if big else _dense_backward_serial)(x, w, dy, dx, dw, db)
    return dx, dw, db


# ---------------------------------------------------------------------------- activations


@_jit
def _relu(z, a):  # pragma: no cover - compiled
    for i in range(z.size):
        a[i] = z[i] if z[i] > 0 else _F32(0.0)


@_jit
def _relu_grad(z, da, dz):  # pragma: no cover - compiled
    for i in range(z.size):
        dz[i] = da[i] if z[i] > 0 else _F32(0.0)


@_jit
def _sigmoid1(z):  # pragma: no cover - compiled
    e = math.exp(-abs(z))
    return 1.0 / (1.0 + e) if z >= 0 else e / (1.0 + e)


@_jit
def _sigmoid(z, p):  # pragma: no cover - compiled
    for i in range(z.size):
        p[i] = _sigmoid1(z[i])


def relu_forward(z: np.ndarray) -> np.ndarray:
    """a = max(z, 0), any shape."""
    _f32("z", z)
    a = np.empty_like(z)
    _relu(z.reshape(-1), a.reshape(-1))
    return a


def relu_backward(z: np.ndarray, da: np.ndarray) -> np.ndarray:
    """dz = da where z > 0 else 0."""
    _f32("z", z)
    _f32("da", da)
    _same_shape("z and da", z, da)
    dz = np.empty_like(z)
    _relu_grad(z.reshape(-1), da.reshape(-1), dz.reshape(-1))
    return dz


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) via exp(-|z|), which never overflows."""
    _f32("z", z)
    p = np.empty_like(z)
    _sigmoid(z.reshape(-1), p.reshape(-1))
    return p


# ---------------------------------------------------------------------------- losses


@_jit
def _bce(z, y, dz):  # pragma: no cover - compiled
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        zi = np.float64(z[i])
        total += max(zi, 0.0) - zi * y[i] + math.log1p(math.exp(-abs(zi)))
        dz[i] = (_sigmoid1(z[i]) - y[i]) / n
    return total / n


@_jit
def _softmax_ce(z, labels, dz):  # pragma: no cover - compiled
    n, k = z.shape
    total = 0.0
    for r in range(n):
        zmax = z[r, 0]
        for j in range(1, k):
            zmax = max(zmax, z[r, j])
        s = _F32(0.0)
        for j in range(k):
            e = math.exp(z[r, j] - zmax)
            dz[r, j] = e
            s += e
        total += math.log(np.float64(s)) - np.float64(z[r, labels[r]] - zmax)
        for j in range(k):
            dz[r, j] = dz[r, j] / s / n
        dz[r, labels[r]] -= _F32(1.0) / n
    return total / n


def bce_with_logits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy on logits and dz = (sigmoid(z) - y) / n, stable for any z."""
    _f32("z", z, 1)
    _f32("y", y, 1)
    _same_shape("z and y", z, y)
    dz = np.empty_like(z)
    if z.shape[0] == 0:
        return 0.0, dz
    return float(_bce(z, y, dz)), dz


def softmax_cross_entropy(z: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean categorical cross-entropy on logits z[n, k] and dz = (softmax - onehot) / n."""
    _f32("z", z, 2)
    n, k = z.shape
    _labels(labels, n, k)
    labels = np.ascontiguousarray(labels)
    dz = np.empty_like(z)
    if n == 0:
        return 0.0, dz
    return float(_softmax_ce(z, labels, dz)), dz


# ---------------------------------------------------------------------------- optimizers


@_jit
def _sgd1(p, g, v, i, lr, mom, wd):  # pragma: no cover - compiled
    vi = mom * v[i] + (g[i] + wd * p[i])
    v[i] = vi
    p[i] -= lr * vi


@_jit
def _sgd_serial(p, g, v, lr, mom, wd):  # pragma: no cover - compiled
    for i in range(p.size):
        _sgd1(p, g, v, i, lr, mom, wd)


@_pjit
def _sgd_parallel(p, g, v, lr, mom, wd):  # pragma: no cover - compiled
    for i in prange(p.size):
        _sgd1(p, g, v, i, lr, mom, wd)


@_jit
def _adam1(p, g, m, v, i, lr, b1, b2, eps, c1, c2, wd):  # pragma: no cover - compiled
    gi = g[i] + wd * p[i]
    mi = b1 * m[i] + (_F32(1.0) - b1) * gi
    vi = b2 * v[i] + (_F32(1.0) - b2) * (gi * gi)
    m[i] = mi
    v[i] = vi
    p[i] -= lr * (mi / c1) / (np.sqrt(vi / c2) + eps)


@_jit
def _adam_serial(p, g, m, v, lr, b1, b2, eps, c1, c2, wd):  # pragma: no cover - compiled
    for i in range(p.size):
        _adam1(p, g, m, v, i, lr, b1, b2, eps, c1, c2, wd)


@_pjit
def _adam_parallel(p, g, m, v, lr, b1, b2, eps, c1, c2, wd):  # pragma: no cover - compiled
    for i in prange(p.size):
        _adam1(p, g, m, v, i, lr, b1, b2, eps, c1, c2, wd)


@_jit
def _prox_serial(g, p, a, mu):  # pragma: no cover - compiled
    for i in range(g.size):
        g[i] += mu * (p[i] - a[i])


@_pjit
def _prox_parallel(g, p, a, mu):  # pragma: no cover - compiled
    for i in prange(g.size):
        g[i] += mu * (p[i] - a[i])


def add_proximal(grad: np.ndarray, params: np.ndarray, anchor: np.ndarray, mu: float) -> None:
    """In place: grad += mu * (params - anchor) (FedProx), one pass over memory."""
    _f32("grad", grad, 1, writable=True)
    _f32("params", params, 1)
    _f32("anchor", anchor, 1)
    _same_shape("grad, params and anchor", grad, params, anchor)
    kernel = _prox_parallel if _parallel(grad.size) else _prox_serial
    kernel(grad, params, anchor, _F32(mu))


def sgd_momentum_step(params: np.ndarray, grad: np.ndarray, velocity: np.ndarray, lr: float,
                      momentum: float, weight_decay: float) -> None:
    """In place: v = momentum*v + grad + wd*params; params -= lr*v, one pass over memory."""
    _f32("params", params, 1, writable=True)
    _f32("grad", grad, 1)
    _f32("velocity", velocity, 1, writable=True)
    _same_shape("params, grad and velocity", params, grad, velocity)
    kernel = _sgd_parallel if _parallel(params.size) else _sgd_serial
    kernel(params, grad, velocity, _F32(lr), _F32(momentum), _F32(weight_decay))


def adam_step(params: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float,
              beta1: float, beta2: float, eps: float, t: int, weight_decay: float) -> None:
    """In place bias-corrected Adam (t from 1) with L2 weight decay, one pass over memory."""
    _f32("params", params, 1, writable=True)
    _f32("grad", grad, 1)
    _f32("m", m, 1, writable=True)
    _f32("v", v, 1, writable=True)
    _same_shape("params, grad, m and v", params, grad, m, v)
    if t < 1:
        raise ValueError(f"t counts steps from 1, got {t}")
    c1, c2 = _F32(1.0 - beta1 ** t), _F32(1.0 - beta2 ** t)
    kernel = _adam_parallel if _parallel(params.size) else _adam_serial
    kernel(params, grad, m, v, _F32(lr), _F32(beta1), _F32(beta2), _F32(eps), c1, c2,
           _F32(weight_decay))


# ---------------------------------------------------------------------------- aggregation


@_jit
def _axpy_serial(acc, x, wt):  # pragma: no cover - compiled
    for i in range(acc.size):
        acc[i] += wt * x[i]


@_pjit
def _axpy_parallel(acc, x, wt):  # pragma: no cover - compiled
    for i in prange(acc.size):
        acc[i] += wt * x[i]


def weighted_accumulate(acc: np.ndarray, x: np.ndarray, weight: float) -> None:
    """In place acc += weight * x: the FedAvg inner loop, memory-bound, parallel when large."""
    _f32("acc", acc, 1, writable=True)
    _f32("x", x, 1)
    _same_shape("acc and x", acc, x)
    (_axpy_parallel if _parallel(acc.size) else _axpy_serial)(acc, x, _F32(weight))


# ---------------------------------------------------------------------------- by concern
# Imaging and conv kernels live in their own modules; re-exported so the backend namespace is
# one flat set of kernel names. They read PARALLEL_MIN_WORK from this module at call time.
from kernels.cpu_codec import (  # noqa: E402, F401
    dequantize_accumulate,
    dequantize_accumulate_many,
    dequantize_int8,
    quantize_int8,
    scatter_dequantize_accumulate,
    topk_indices,
)
from kernels.cpu_conv import (  # noqa: E402, F401
    conv2d_backward,
    conv2d_forward,
    global_avgpool_backward,
    global_avgpool_forward,
    maxpool2_backward,
    maxpool2_forward,
)
from kernels.cpu_imaging import preprocess_slice, resample_depth  # noqa: E402, F401
from kernels.cpu_privacy import clip_rows_sum, mask_accumulate  # noqa: E402, F401
from kernels.cpu_robust import (  # noqa: E402, F401
    clip_to_norm,
    coordinate_median,
    l2_norms,
    pairwise_sq_distances,
    trimmed_mean,
)

"""CuPy kernels: the same functions and signatures as `kernels.reference`, on a CUDA device.

Design: dense layers go to cuBLAS through `cupy.matmul` (CuPy leaves TF32 off unless
CUPY_TF32=1, so products are true float32); element-wise steps (activations, optimizer steps,
the FedAvg axpy) are small raw CUDA kernels, one pass over memory each; the softmax loss uses
CuPy's reductions. Arguments are checked on the host exactly as the cpu backend checks them
(float32, C-contiguous), so the two backends refuse the same inputs with the same words.

Arguments may be numpy arrays (results come back to the host; arrays updated in place are
copied back) or CuPy arrays (nothing leaves the device). The training loop still hands numpy
arrays over, so on a GPU site every kernel call pays its transfers; keeping the model on the
device between calls is the next step for GPU training, not done here. See `kernels.gpu_common`.
"""

from __future__ import annotations

import numpy as np

from kernels.gpu_common import (
    ARRAY_TYPES,
    cp,
    launch_1d,
    like,
    on_device,
    raw_kernel,
    store,
    to_device,
)
from kernels.ref_checks import check_f32
from kernels.reference import _labels, _same_shape

_F32 = np.float32

_SOURCE = r"""
extern "C" __global__ void relu(const float* z, float* a, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] = z[i] > 0.0f ? z[i] : 0.0f;
}

extern "C" __global__ void relu_grad(const float* z, const float* da, float* dz, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dz[i] = z[i] > 0.0f ? da[i] : 0.0f;
}

__device__ __forceinline__ float sigmoid1(float z) {
    float e = expf(-fabsf(z));  /* never overflows */
    return z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

extern "C" __global__ void sigmoid(const float* z, float* p, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = sigmoid1(z[i]);
}

extern "C" __global__ void bce_grad(const float* z, const float* y, float* dz, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dz[i] = (sigmoid1(z[i]) - y[i]) / (float)n;
}

extern "C" __global__ void sgd(float* p, const float* g, float* v, long long n,
                               float lr, float mom, float wd) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float vi = mom * v[i] + (g[i] + wd * p[i]);
        v[i] = vi;
        p[i] -= lr * vi;
    }
}

extern "C" __global__ void adam(float* p, const float* g, float* m, float* v, long long n,
                                float lr, float b1, float b2, float eps, float c1, float c2,
                                float wd) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float gi = g[i] + wd * p[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi / c1) / (sqrtf(vi / c2) + eps);
    }
}

extern "C" __global__ void axpy(float* acc, const float* x, long long n, float w) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, x[i]));
}
"""


def _run(name: str, n: int, *args: object) -> None:
    """Launch one element-wise kernel over n elements (nothing to do for n == 0)."""
    if n:
        launch_1d(raw_kernel(_SOURCE, name), n, args)


def _f32(name: str, a: np.ndarray, ndim: int | None = None) -> None:
    check_f32(name, a, ndim, types=ARRAY_TYPES)


def _f32_inplace(name: str, a: np.ndarray) -> None:
    check_f32(name, a, 1, writable=True, types=ARRAY_TYPES)


# ---------------------------------------------------------------------------- dense layer


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y = x @ w + b through cuBLAS."""
    _f32("x", x, 2)
    _f32("w", w, 2)
    _f32("b", b, 1)
    if x.shape[1] != w.shape[0] or b.shape[0] != w.shape[1]:
        raise ValueError(f"shapes x{x.shape} w{w.shape} b{b.shape} do not chain")
    y = cp.matmul(to_device(x), to_device(w))
    y += to_device(b)
    return like(y, x)


def dense_backward(x: np.ndarray, w: np.ndarray,
                   dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dw, db) of y = x @ w + b: two cuBLAS products and a column sum."""
    _f32("x", x, 2)
    _f32("w", w, 2)
    _f32("dy", dy, 2)
    if x.shape[1] != w.shape[0] or dy.shape != (x.shape[0], w.shape[1]):
        raise ValueError(f"shapes x{x.shape} w{w.shape} dy{dy.shape} do not chain")
    xd, wd, dyd = to_device(x), to_device(w), to_device(dy)
    dx = cp.ascontiguousarray(cp.matmul(dyd, wd.T))
    dw = cp.ascontiguousarray(cp.matmul(xd.T, dyd))
    db = dyd.sum(axis=0)
    return like(dx, x), like(dw, x), like(db, x)


# ---------------------------------------------------------------------------- activations


def _unary(name: str, z: np.ndarray) -> np.ndarray:
    zd = to_device(z)
    out = cp.empty_like(zd)
    _run(name, z.size, zd, out, np.int64(z.size))
    return like(out, z)


def relu_forward(z: np.ndarray) -> np.ndarray:
    """a = max(z, 0), any shape."""
    _f32("z", z)
    return _unary("relu", z)


def relu_backward(z: np.ndarray, da: np.ndarray) -> np.ndarray:
    """dz = da where z > 0 else 0."""
    _f32("z", z)
    _f32("da", da)
    _same_shape("z and da", z, da)
    zd = to_device(z)
    dz = cp.empty_like(zd)
    _run("relu_grad", z.size, zd, to_device(da), dz, np.int64(z.size))
    return like(dz, z)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) via exp(-|z|), which never overflows."""
    _f32("z", z)
    return _unary("sigmoid", z)


# ---------------------------------------------------------------------------- losses


def bce_with_logits(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy on logits (summed in float64) and dz = (sigmoid(z) - y) / n."""
    _f32("z", z, 1)
    _f32("y", y, 1)
    _same_shape("z and y", z, y)
    n = z.shape[0]
    zd, yd = to_device(z), to_device(y)
    dz = cp.empty_like(zd)
    if n == 0:
        return 0.0, like(dz, z)
    _run("bce_grad", n, zd, yd, dz, np.int64(n))
    z64, y64 = zd.astype(cp.float64), yd.astype(cp.float64)
    per = cp.maximum(z64, 0) - z64 * y64 + cp.log1p(cp.exp(-cp.abs(z64)))
    return float(per.mean()), like(dz, z)


def softmax_cross_entropy(z: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean categorical cross-entropy on logits z[n, k] and dz = (softmax - onehot) / n."""
    _f32("z", z, 2)
    n, k = z.shape
    _labels(cp.asnumpy(labels) if on_device(labels) else labels, n, k)
    zd = to_device(z)
    if n == 0:
        return 0.0, like(cp.empty_like(zd), z)
    ld = to_device(labels)
    s = zd - zd.max(axis=1, keepdims=True)
    e = cp.exp(s)
    total = e.sum(axis=1, keepdims=True)
    rows = cp.arange(n)
    per = cp.log(total[:, 0].astype(cp.float64)) - s[rows, ld].astype(cp.float64)
    dz = e / total
    dz[rows, ld] -= 1
    dz /= _F32(n)
    return float(per.mean()), like(dz, z)


# ---------------------------------------------------------------------------- optimizers


def add_proximal(grad: np.ndarray, params: np.ndarray, anchor: np.ndarray, mu: float) -> None:
    """In place: grad += mu * (params - anchor) (FedProx)."""
    _f32_inplace("grad", grad)
    _f32("params", params, 1)
    _f32("anchor", anchor, 1)
    _same_shape("grad, params and anchor", grad, params, anchor)
    gd = to_device(grad)
    gd += _F32(mu) * (to_device(params) - to_device(anchor))
    store(grad, gd)


def sgd_momentum_step(params: np.ndarray, grad: np.ndarray, velocity: np.ndarray, lr: float,
                      momentum: float, weight_decay: float) -> None:
    """In place: v = momentum*v + grad + wd*params; params -= lr*v, one pass over memory."""
    _f32_inplace("params", params)
    _f32("grad", grad, 1)
    _f32_inplace("velocity", velocity)
    _same_shape("params, grad and velocity", params, grad, velocity)
    pd, vd = to_device(params), to_device(velocity)
    _run("sgd", params.size, pd, to_device(grad), vd, np.int64(params.size), _F32(lr),
         _F32(momentum), _F32(weight_decay))
    store(params, pd)
    store(velocity, vd)


def adam_step(params: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float,
              beta1: float, beta2: float, eps: float, t: int, weight_decay: float) -> None:
    """In place bias-corrected Adam (t from 1) with L2 weight decay, one pass over memory."""
    _f32_inplace("params", params)
    _f32("grad", grad, 1)
    _f32_inplace("m", m)
    _f32_inplace("v", v)
    _same_shape("params, grad, m and v", params, grad, m, v)
    if t < 1:
        raise ValueError(f"t counts steps from 1, got {t}")
    c1, c2 = _F32(1.0 - beta1 ** t), _F32(1.0 - beta2 ** t)
    pd, md, vd = to_device(params), to_device(m), to_device(v)
    _run("adam", params.size, pd, to_device(grad), md, vd, np.int64(params.size), _F32(lr),
         _F32(beta1), _F32(beta2), _F32(eps), c1, c2, _F32(weight_decay))
    store(params, pd)
    store(m, md)
    store(v, vd)


# ---------------------------------------------------------------------------- aggregation


def weighted_accumulate(acc: np.ndarray, x: np.ndarray, weight: float) -> None:
    """In place acc += weight * x: the FedAvg inner loop over float32 updates."""
    _f32_inplace("acc", acc)
    _f32("x", x, 1)
    _same_shape("acc and x", acc, x)
    ad = to_device(acc)
    _run("axpy", acc.size, ad, to_device(x), np.int64(acc.size), _F32(weight))
    store(acc, ad)


# ---------------------------------------------------------------------------- by concern
# Codec, imaging and conv kernels live in their own modules; re-exported so the backend
# namespace is one flat set of kernel names.
from kernels.gpu_codec import (  # noqa: E402, F401
    dequantize_accumulate,
    dequantize_accumulate_many,
    dequantize_int8,
    quantize_int8,
    scatter_dequantize_accumulate,
    topk_indices,
)
from kernels.gpu_conv import (  # noqa: E402, F401
    conv2d_backward,
    conv2d_forward,
    global_avgpool_backward,
    global_avgpool_forward,
    maxpool2_backward,
    maxpool2_forward,
)
from kernels.gpu_imaging import preprocess_slice, resample_depth  # noqa: E402, F401
from kernels.gpu_privacy import clip_rows_sum, mask_accumulate  # noqa: E402, F401
from kernels.gpu_robust import (  # noqa: E402, F401
    clip_to_norm,
    coordinate_median,
    l2_norms,
    pairwise_sq_distances,
    trimmed_mean,
)

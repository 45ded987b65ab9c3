"""CuPy update codec kernels: the GPU twins of `kernels.ref_codec`, bit for bit.

Quantization runs one CUDA block per quantization block: the block's max |x| is reduced in
shared memory, then each thread writes its codes from the same (cache-hot) values. The
splitmix64 draw is recomputed per element from (seed, offset + i), as on the CPU, so codes equal
the oracle's exactly. Dequantize-and-accumulate also walks one quantization block per CUDA block
(its scale read once, no per-element division), each thread issuing four independent loads
before its stores so enough memory requests are in flight to run at the card's bandwidth.
Multiplies and adds use __fmul_rn / __fadd_rn so the compiler cannot fuse them into an FMA that
rounds differently from numpy. Top-k sorts the magnitudes on the device (CUB radix sort) for
the threshold and keeps ties lowest-index first with a running count.

Arguments may be numpy arrays (results come back to the host) or CuPy arrays (everything stays
on the device, as the coordinator's GPU sum and `fedsilo bench --backend gpu` use it).
"""

from __future__ import annotations

import numpy as np

from kernels.gpu_common import (
    ARRAY_TYPES,
    cp,
    launch_1d,
    like,
    raw_kernel,
    store,
    threads_for,
    to_device,
)
from kernels.ref_codec import (
    check_accumulate,
    check_block,
    check_codes,
    check_many,
    check_scatter,
    check_seed,
    check_topk,
    check_vector,
    n_blocks,
)

_SOURCE = r"""
__device__ __forceinline__ float draw(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed + (index + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return __fmul_rn((float)(z >> 40), 5.9604644775390625e-08f);  /* exact: < 2**24 times 2**-24 */
}

extern "C" __global__ void quantize_int8(const float* x, signed char* q, float* scales,
                                         long long n, long long block,
                                         unsigned long long seed, unsigned long long offset,
                                         int* bad) {
    __shared__ float smax[256];
    __shared__ int sbad;
    const long long lo = (long long)blockIdx.x * block;
    const long long hi = min(lo + block, n);
    if (threadIdx.x == 0) sbad = 0;
    float m = 0.0f;
    int nonfinite = 0;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float a = fabsf(x[i]);
        if (isfinite(a)) m = fmaxf(m, a); else nonfinite = 1;
    }
    smax[threadIdx.x] = m;
    __syncthreads();
    if (nonfinite) atomicOr(&sbad, 1);
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
        __syncthreads();
    }
    if (sbad) {
        if (threadIdx.x == 0) atomicOr(bad, 1);
        return;
    }
    const float scale = __fdiv_rn(smax[0], 127.0f);
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        if (scale == 0.0f) { q[i] = 0; continue; }
        float u = draw(seed, offset + (unsigned long long)i);
        float v = floorf(__fadd_rn(__fdiv_rn(x[i], scale), u));
        q[i] = (signed char)fminf(fmaxf(v, -127.0f), 127.0f);
    }
}

extern "C" __global__ void dequantize_accumulate(float* acc, const signed char* q,
                                                 const float* scales, long long n,
                                                 long long block, float w) {
    const long long lo = (long long)blockIdx.x * block;
    const long long hi = min(lo + block, n);
    const float s = scales[blockIdx.x];
    const long long t = blockDim.x;
    for (long long base = lo + threadIdx.x; base < hi; base += 4 * t) {
        float a[4], d[4];
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            long long i = base + u * t;
            if (i < hi) { a[u] = acc[i]; d[u] = (float)q[i]; }
        }
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            long long i = base + u * t;
            if (i < hi) acc[i] = __fadd_rn(a[u], __fmul_rn(w, __fmul_rn(d[u], s)));
        }
    }
}

extern "C" __global__ void dequantize_accumulate_many(float* acc, const signed char* q,
                                                      const float* scales, const float* w,
                                                      long long n, long long nb,
                                                      long long block, int sites) {
    /* Sites in order per element, as numpy adds them: equal to one call per site. Each
       thread keeps four elements (strided by the block width) and issues their four loads
       per site together, so enough requests are in flight. */
    const long long lo = (long long)blockIdx.x * block;
    const long long hi = min(lo + block, n);
    const long long t = blockDim.x;
    for (long long base = lo + threadIdx.x; base < hi; base += 4 * t) {
        float a[4];
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            long long i = base + u * t;
            a[u] = i < hi ? acc[i] : 0.0f;
        }
        for (int s = 0; s < sites; s++) {
            const signed char* qs = q + (long long)s * n;
            const float c = scales[(long long)s * nb + blockIdx.x];
            const float ws = w[s];
            float d[4];
            #pragma unroll
            for (int u = 0; u < 4; u++) {
                long long i = base + u * t;
                d[u] = i < hi ? (float)qs[i] : 0.0f;
            }
            #pragma unroll
            for (int u = 0; u < 4; u++) a[u] = __fadd_rn(a[u], __fmul_rn(ws, __fmul_rn(d[u], c)));
        }
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            long long i = base + u * t;
            if (i < hi) acc[i] = a[u];
        }
    }
}

extern "C" __global__ void dequantize(const signed char* q, const float* scales, float* out,
                                      long long n, long long block) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __fmul_rn((float)q[i], scales[i / block]);
}

extern "C" __global__ void scatter_accumulate(float* acc, const long long* idx,
                                              const signed char* q, const float* scales,
                                              long long m, long long block, float w) {
    long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < m) {
        long long i = idx[j];  /* unique (checked): no two threads write one element */
        acc[i] = __fadd_rn(acc[i], __fmul_rn(w, __fmul_rn((float)q[j], scales[j / block])));
    }
}
"""


def _kernel(name: str):
    return raw_kernel(_SOURCE, name)


def quantize_int8(x: np.ndarray, block: int, seed: int, offset: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """See `kernels.ref_codec.quantize_int8`; codes and scales live where `x` lives."""
    check_vector("x", x, np.float32, types=ARRAY_TYPES)
    check_block(block)
    check_seed(seed, offset)
    xd = to_device(x)
    nb = n_blocks(x.size, block)
    q = cp.empty(x.size, dtype=cp.int8)
    scales = cp.empty(nb, dtype=cp.float32)
    if nb:
        bad = cp.zeros(1, dtype=cp.int32)
        _kernel("quantize_int8")((nb,), (threads_for(block),),
                                 (xd, q, scales, np.int64(x.size), np.int64(block),
                                  np.uint64(seed), np.uint64(offset), bad))
        if int(bad.get()[0]):
            raise ValueError("update contains NaN or infinity")
    return like(q, x), like(scales, x)


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    check_codes(q, scales, block, ARRAY_TYPES)
    out = cp.empty(q.size, dtype=cp.float32)
    if q.size:
        launch_1d(_kernel("dequantize"), q.size,
                  (to_device(q), to_device(scales), out, np.int64(q.size), np.int64(block)))
    return like(out, q)


def dequantize_accumulate(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                          weight: float) -> None:
    """In place acc += weight * (q * scale), one pass: read codes and acc, write acc."""
    check_accumulate(acc, q, scales, block, ARRAY_TYPES)
    if acc.size == 0:
        return
    ad = to_device(acc)
    _kernel("dequantize_accumulate")(
        (n_blocks(acc.size, block),), (threads_for(block, 4),),
        (ad, to_device(q), to_device(scales), np.int64(acc.size), np.int64(block),
         np.float32(weight)))
    store(acc, ad)


def dequantize_accumulate_many(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int,
                               weights: np.ndarray) -> None:
    """In place acc += sum over sites of weights[s] * (q[s] * scale), one pass over acc."""
    check_many(acc, q, scales, block, weights, ARRAY_TYPES)
    if acc.size == 0 or weights.size == 0:
        return
    ad = to_device(acc)
    nb = n_blocks(acc.size, block)
    _kernel("dequantize_accumulate_many")(
        (nb,), (threads_for(block, 4),),
        (ad, to_device(q), to_device(scales), to_device(weights), np.int64(acc.size),
         np.int64(nb), np.int64(block), np.int32(weights.size)))
    store(acc, ad)


def topk_indices(v: np.ndarray, k: int) -> np.ndarray:
    """Ascending int64 indices of the k largest |v|, ties at the threshold lowest index first."""
    check_topk(v, k, ARRAY_TYPES)
    vd = to_device(v)
    if v.size and not bool(cp.isfinite(vd).all()):
        raise ValueError("update contains NaN or infinity")
    if k == 0:
        return like(cp.zeros(0, dtype=cp.int64), v)
    a = cp.abs(vd)
    threshold = cp.sort(a)[v.size - k]
    above = a > threshold
    ties = a == threshold
    room = k - int(cp.count_nonzero(above))
    keep = above | (ties & (cp.cumsum(ties, dtype=cp.int64) <= room))
    return like(cp.flatnonzero(keep).astype(cp.int64, copy=False), v)


def scatter_dequantize_accumulate(acc: np.ndarray, idx: np.ndarray, q: np.ndarray,
                                  scales: np.ndarray, block: int, weight: float) -> None:
    check_scatter(acc, idx, q, scales, block, ARRAY_TYPES)
    if idx.size == 0:
        return
    ad = to_device(acc)
    launch_1d(_kernel("scatter_accumulate"), idx.size,
              (ad, to_device(idx), to_device(q), to_device(scales), np.int64(idx.size),
               np.int64(block), np.float32(weight)))
    store(acc, ad)


"""CuPy privacy kernels: the GPU twins of `kernels.ref_privacy`, simple on purpose.

Mask expansion is one RawKernel, one thread per ChaCha20 block of the slice: the thread builds
each key's state in registers (fully unrolled, so the 16 words never touch memory), runs the
20 rounds, sums the k signed masks into 16 registers and adds them to its words of `acc`.
uint32 arithmetic wraps in CUDA as in numpy, so the result is the oracle's bit for bit.

Clipping: float64 row norms by a ReductionKernel, then one thread per column sums the scaled
rows in row order in float64 (__dmul_rn / __dadd_rn: no FMA contraction, the oracle's
arithmetic) and rounds once to float32.

Arguments may be numpy arrays (results come back to the host; `acc` is updated where it
lives) or CuPy arrays (nothing leaves the device but the small keys, signs and the count).
Importing never needs CuPy.
"""

from __future__ import annotations

import functools
from typing import Any

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
from kernels.ref_privacy import check_clip, check_masks, check_rows

_SOURCE = r"""
#define ROTL(v, r) (((v) << (r)) | ((v) >> (32 - (r))))
#define QR(a, b, c, d) \
    a += b; d ^= a; d = ROTL(d, 16); \
    c += d; b ^= c; b = ROTL(b, 12); \
    a += b; d ^= a; d = ROTL(d, 8);  \
    c += d; b ^= c; b = ROTL(b, 7);

extern "C" __global__ void mask_accumulate(unsigned int* acc, const unsigned int* keys,
                                           const int* signs, int k, long long start,
                                           long long n, long long b0, long long nblocks) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nblocks) return;
    long long b = b0 + t;
    unsigned int sum[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) sum[i] = 0u;
    for (int j = 0; j < k; ++j) {
        unsigned int in[16], x[16];
        in[0] = 0x61707865u; in[1] = 0x3320646eu; in[2] = 0x79622d32u; in[3] = 0x6b206574u;
#pragma unroll
        for (int i = 0; i < 8; ++i) in[4 + i] = keys[8 * j + i];
        in[12] = (unsigned int)b;  /* the 32-bit block counter; the nonce is all zero */
        in[13] = 0u; in[14] = 0u; in[15] = 0u;
#pragma unroll
        for (int i = 0; i < 16; ++i) x[i] = in[i];
#pragma unroll
        for (int r = 0; r < 10; ++r) {
            QR(x[0], x[4], x[8], x[12]) QR(x[1], x[5], x[9], x[13])
            QR(x[2], x[6], x[10], x[14]) QR(x[3], x[7], x[11], x[15])
            QR(x[0], x[5], x[10], x[15]) QR(x[1], x[6], x[11], x[12])
            QR(x[2], x[7], x[8], x[13]) QR(x[3], x[4], x[9], x[14])
        }
        bool plus = signs[j] > 0;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            unsigned int w = x[i] + in[i];
            sum[i] = plus ? sum[i] + w : sum[i] - w;
        }
    }
    long long base = b * 16 - start;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        long long w = base + i;
        if (w >= 0 && w < n) acc[w] += sum[i];
    }
}

extern "C" __global__ void clip_sum(const float* rows, const double* scale, float* out,
                                    long long b, long long n) {
    long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    double s = 0.0;
    for (long long r = 0; r < b; ++r)  /* row order, as the oracle */
        s = __dadd_rn(s, __dmul_rn((double)rows[r * n + c], scale[r]));
    out[c] = (float)s;
}
"""


@functools.cache
def _sq_norm_kernel() -> Any:
    return cp.ReductionKernel("float32 x", "float64 s", "(double)x * (double)x", "a + b",
                              "s = a", "0", "fedsilo_sq_norm", reduce_type="float64")


def mask_accumulate(acc: Any, keys: Any, signs: Any, start: int = 0) -> None:
    """See `kernels.ref_privacy.mask_accumulate`; one CUDA thread per ChaCha20 block."""
    keys = cp.asnumpy(keys) if on_device(keys) else keys
    signs = cp.asnumpy(signs) if on_device(signs) else signs
    s, words, sg = check_masks(acc, keys, signs, start, ARRAY_TYPES)
    n = acc.shape[0]
    if n == 0 or words.shape[0] == 0:
        return
    b0, b1 = s // 16, (s + n + 15) // 16
    ad = to_device(acc)
    launch_1d(raw_kernel(_SOURCE, "mask_accumulate"), b1 - b0,
              (ad, cp.asarray(words), cp.asarray(sg), np.int32(words.shape[0]), np.int64(s),
               np.int64(n), np.int64(b0), np.int64(b1 - b0)))
    store(acc, ad)


def clip_rows_sum(rows: Any, clip: float) -> tuple[Any, int]:
    """See `kernels.ref_privacy.clip_rows_sum`; the sum comes back where `rows` lives."""
    check_rows(rows, ARRAY_TYPES)
    c = check_clip(clip)
    b, n = rows.shape
    rd = to_device(rows)
    out = cp.empty(n, dtype=cp.float32)
    if b == 0:
        out.fill(0)
        return like(out, rows), 0
    norms = cp.sqrt(_sq_norm_kernel()(rd, axis=1))
    over = norms > c
    scale = cp.where(over, c / cp.where(over, norms, 1.0), 1.0).astype(cp.float64)
    if n:
        launch_1d(raw_kernel(_SOURCE, "clip_sum"), n,
                  (rd, cp.ascontiguousarray(scale), out, np.int64(b), np.int64(n)))
    return like(out, rows), int(over.sum())

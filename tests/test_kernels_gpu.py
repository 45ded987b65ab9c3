"""The gpu backend's own promises, beyond matching the oracle (test_kernels*.py do that).

It imports on any machine (without CuPy it simply is unavailable, and the registry says why);
on a CUDA device its codec and aggregation kernels take device arrays, leave results there,
update device sums in place, and give the oracle's results bit for bit at sizes that span many
CUDA blocks. The device cases skip cleanly where there is no GPU.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import kernels
from kernels import reference as ref

F32 = np.float32


def test_gpu_modules_import_without_cupy_and_registry_says_why():
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # any `import cupy` now raises ImportError
        "import kernels, kernels.gpu as g, kernels.gpu_common as c\n"
        "assert c.cp is None\n"
        "missing = [n for n in kernels.KERNEL_NAMES if not callable(getattr(g, n, None))]\n"
        "print(missing, kernels.available_backends()['gpu'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[] gpu: cupy not installed"


@pytest.fixture
def gpu():
    reason = kernels.available_backends()["gpu"]
    if reason is not None:
        pytest.skip(reason)
    import cupy

    return kernels.get_backend("gpu"), cupy


def vec(rng, n, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(F32)


def test_device_arrays_stay_on_the_device_and_match_the_oracle(gpu):
    k, cp = gpu
    rng = np.random.default_rng(0)
    n, block = 3_000_003, 256  # ~11,700 CUDA blocks and a partial last block
    x = vec(rng, n, 0.02)
    q, s = k.quantize_int8(cp.asarray(x), block, 99, 5)
    assert isinstance(q, cp.ndarray) and isinstance(s, cp.ndarray)
    rq, rs = ref.quantize_int8(x, block, 99, 5)
    assert np.array_equal(q.get(), rq) and np.array_equal(s.get(), rs)

    acc0 = vec(rng, n)
    acc = cp.asarray(acc0)
    before = acc.data.ptr
    for w in (0.5, 17.0):
        k.dequantize_accumulate(acc, q, s, block, w)
        ref.dequantize_accumulate(acc0, rq, rs, block, w)
    assert acc.data.ptr == before  # summed in place, no new buffer
    assert np.array_equal(acc.get(), acc0)

    # several sites in one pass, all on the device: equal to one call per site
    qs = cp.stack([q, q[::-1].copy()])
    ss = cp.stack([s, s[::-1].copy()])
    weights = np.array([3.0, 0.25], F32)
    k.dequantize_accumulate_many(acc, qs, ss, block, cp.asarray(weights))
    for i in range(2):
        ref.dequantize_accumulate(acc0, qs[i].get(), ss[i].get(), block, float(weights[i]))
    assert acc.data.ptr == before and np.array_equal(acc.get(), acc0)

    idx = k.topk_indices(cp.asarray(x), n // 100)
    assert isinstance(idx, cp.ndarray)
    assert np.array_equal(idx.get(), ref.topk_indices(x, n // 100))


def test_error_feedback_on_the_device_conserves_what_was_not_sent(gpu):
    k, cp = gpu
    rng = np.random.default_rng(4)
    n, kk, block = 200_000, 2_000, 256
    residual = cp.zeros(n, dtype=cp.float32)
    sent_total = cp.zeros(n, dtype=cp.float64)
    produced = cp.zeros(n, dtype=cp.float64)
    for r in range(10):
        delta = cp.asarray(vec(rng, n, 0.1))
        produced += delta
        v = delta + residual
        idx = k.topk_indices(v, kk)
        q, s = k.quantize_int8(cp.ascontiguousarray(v[idx]), block, r)
        sent = cp.zeros(n, dtype=cp.float32)
        k.scatter_dequantize_accumulate(sent, idx, q, s, block, 1.0)
        residual = v - sent
        sent_total += sent
    np.testing.assert_allclose((sent_total + residual).get(), produced.get(), atol=2e-5)
    assert float(cp.abs(residual).max()) < float(cp.abs(produced).max())


def test_device_refusals_read_like_the_host_ones(gpu):
    k, cp = gpu
    with pytest.raises(ValueError, match="NaN"):
        k.quantize_int8(cp.asarray(np.array([1.0, np.nan], F32)), 2, 0)
    with pytest.raises(ValueError, match="ascending"):
        k.scatter_dequantize_accumulate(cp.zeros(4, dtype=cp.float32), cp.asarray([2, 1]),
                                        cp.ones(2, dtype=cp.int8), cp.ones(1, dtype=cp.float32),
                                        2, 1.0)
    with pytest.raises(TypeError, match="float32"):
        k.weighted_accumulate(cp.zeros(3, dtype=cp.float64), cp.zeros(3, dtype=cp.float32), 1.0)


def test_memory_cap_turns_an_oversized_allocation_into_memory_error(gpu):
    """A hardware profile's memory_cap_mib on a shared GPU: past the cap CuPy's pool refuses
    with a MemoryError (which the site reports as `out_of_memory`) instead of taking the rest of
    the card; under it, work goes on; 0 lifts the cap."""
    from kernels.gpu_common import set_memory_limit_mib

    _k, cupy = gpu
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    held_mib = -(-pool.total_bytes() // (1 << 20))  # arrays other tests still hold
    try:
        set_memory_limit_mib(held_mib + 64)
        small = cupy.ones(8 << 20, dtype=cupy.float32)  # 32 MiB: under the cap
        assert float(small.sum()) == 8 << 20
        with pytest.raises(MemoryError):
            cupy.empty(24 << 20, dtype=cupy.float32)  # another 96 MiB
        del small
    finally:
        set_memory_limit_mib(0)
    assert pool.get_limit() == 0
    cupy.empty(24 << 20, dtype=cupy.float32)  # fine again

"""Secure-aggregation mask expansion: numpy oracle vs Numba vs OpenSSL's ChaCha20, one run.

A site masks its quantized update (uint32 words) with one ChaCha20 mask per other site
(`--keys`, default 9: a federation of 10 sites), so expansion costs `keys` keystream words per
output word. For each vector size, the median of `--repeats` runs (after one warm-up) of
  reference  kernels.reference.mask_accumulate (vectorised numpy ChaCha20)
  numba      kernels.cpu.mask_accumulate (fused, parallel over blocks, keystream never stored)
  openssl    the `cryptography` package's ChaCha20 keystream per key (encrypting zeros into a
             reused buffer) then a numpy add or subtract into the vector: the baseline
as GB/s of uint32 output (4 bytes per word of the vector), all measured in this process.

Usage: python benchmarks/bench_masks.py [--sizes 1000000 10000000] [--keys 9] [--repeats 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

import kernels
from agent.ops.bench import _median_seconds


def openssl_masks(n: int, keys: np.ndarray, signs: np.ndarray) -> Callable[[np.ndarray], None]:
    """The baseline: acc += sign * keystream, one `cryptography` ChaCha20 per key (block
    counter 0, zero nonce: the same masks as the kernels)."""
    zeros = bytes(4 * n)
    buf = bytearray(4 * n + 63)  # update_into wants room for a block beyond the data
    ks = np.frombuffer(buf, dtype="<u4", count=n)

    def run(acc: np.ndarray) -> None:
        for key, sign in zip(keys, signs, strict=True):
            enc = Cipher(algorithms.ChaCha20(key.tobytes(), bytes(16)), mode=None).encryptor()
            enc.update_into(zeros, buf)
            if sign > 0:
                acc += ks
            else:
                acc -= ks

    return run


def measure(ref: ModuleType, cpu: ModuleType, base: np.ndarray, keys: np.ndarray,
            signs: np.ndarray, repeats: int) -> dict[str, float]:
    """GB/s of uint32 output for the three ways, each on its own copy of `base`."""
    n = base.shape[0]
    acc = {name: base.copy() for name in ("reference", "numba", "openssl")}
    baseline = openssl_masks(n, keys, signs)
    runs = {"reference": lambda: ref.mask_accumulate(acc["reference"], keys, signs),
            "numba": lambda: cpu.mask_accumulate(acc["numba"], keys, signs),
            "openssl": lambda: baseline(acc["openssl"])}
    gbps = {name: 4 * n / _median_seconds(fn, repeats) / 1e9 for name, fn in runs.items()}
    # Each ran repeats + 1 times on its own copy: the three must still agree exactly.
    assert np.array_equal(acc["numba"], acc["reference"])
    assert np.array_equal(acc["openssl"], acc["reference"])
    return gbps


def main() -> None:
    if __name__ != "__main__":
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--keys", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ref = kernels.get_backend("reference")
    cpu = kernels.get_backend("cpu")
    import numba

    print(f"mask expansion, {args.keys} keys, median of {args.repeats} runs; numba "
          f"{numba.__version__} with {numba.get_num_threads()} threads", flush=True)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, size=(args.keys, 32), dtype=np.uint8)
    signs = rng.choice(np.array([1, -1], dtype=np.int32), size=args.keys)
    print(f"{'words':>12} {'reference':>11} {'numba':>11} {'openssl':>11} "
          f"{'numba/ref':>10} {'numba/openssl':>14}")
    for n in args.sizes:
        base = rng.integers(0, 1 << 16, size=n, dtype=np.uint32)
        gbps = measure(ref, cpu, base, keys, signs, args.repeats)
        print(f"{n:>12,} {gbps['reference']:>7.3f} GB/s {gbps['numba']:>6.3f} GB/s "
              f"{gbps['openssl']:>6.3f} GB/s {gbps['numba'] / gbps['reference']:>9.1f}x "
              f"{gbps['numba'] / gbps['openssl']:>13.2f}x", flush=True)


main()

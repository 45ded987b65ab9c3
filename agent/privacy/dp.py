"""The Gaussian mechanism's pieces at a site or the coordinator: clipping and noise.

Noise comes from numpy's PCG64DXSM generator seeded with 256 bits from the OS CSPRNG
(`os.urandom`) afresh for every release. numpy's generators are not cryptographic: with
enough raw outputs one could in principle recover the state; but their outputs never leave
as such (they are added to an update, quantized, masked), a state covers one release only,
and the seed is never stored or sent. Drawing 1e6 Gaussians from a stream cipher (ChaCha20 +
Box-Muller) would close even that gap at ~10x the time; we note it as the upgrade path.
"""

from __future__ import annotations

import math
import os

import numpy as np


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG (256 bits), fresh for each release."""
    return np.random.Generator(np.random.PCG64DXSM(int.from_bytes(os.urandom(32), "little")))


def clip_to_norm(delta: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """(a float32 copy of `delta` scaled to L2 norm <= clip, its norm before), norm in float64:
    bounds one contributor's influence on a sum (the mechanism's sensitivity)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be positive and finite, got {clip}")
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    out = np.array(delta, dtype=np.float32, copy=True)
    if norm > clip:
        out *= np.float32(clip / norm)
        # float32 rounding may leave the norm a hair above clip: shrink once more if so
        after = float(np.linalg.norm(out.astype(np.float64)))
        if after > clip:
            out *= np.float32(clip / after * (1 - 1e-7))
    return out, norm


def gaussian_noise(n: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """n draws of N(0, std^2), float32."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    return (rng.standard_normal(n) * std).astype(np.float32)


def site_noise_std(sigma: float, clip: float, n_sites: int) -> float:
    """The std each of `n_sites` adds so their sum carries sigma x clip (sums of independent
    Gaussians add variances). Assumes the sites are honest; a member lost before its upload
    makes the coordinator re-run the epoch, with the new count."""
    if n_sites < 1:
        raise ValueError("n_sites must be at least 1")
    return sigma * clip / math.sqrt(n_sites)

"""Local training for one federated round: a few epochs of mini-batch SGD or Adam.

Standard FedAvg: optimizer state starts fresh each call and only the new parameters leave this
function. Pure apart from the wall-clock measurement: the same seed gives the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from agent.config import TrainingSpec
from agent.learn.layout import Layout
from agent.learn.models import loss_and_grad

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TrainResult:
    """What one local training run produced (params is a new array; the input is untouched)."""

    params: np.ndarray
    n_samples: int
    mean_loss: float  # sample-weighted mean of the batch losses of the last epoch
    steps: int
    seconds: float


def _check_inputs(layout: Layout, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                  training: TrainingSpec, images: np.ndarray | None) -> None:
    for name, a in (("params", params), ("x", x), ("y", y)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            raise TypeError(f"{name} must be a float32 array")
    if params.shape != (layout.size,):
        raise ValueError(f"params must have shape ({layout.size},), got {params.shape}")
    if x.ndim != 2 or x.shape[1] != layout.n_inputs or x.shape[0] < 1:
        raise ValueError(f"x must have shape (n >= 1, {layout.n_inputs}), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if layout.image_shape is None and images is not None:
        raise ValueError(f"a {layout.kind} model reads no images, but images were given")
    if layout.image_shape is not None:
        want = (x.shape[0], *layout.image_shape)
        if not isinstance(images, np.ndarray) or images.dtype != np.float32 \
                or images.shape != want:
            raise ValueError(f"a {layout.kind} model needs float32 images of shape {want}, got "
                             f"{getattr(images, 'dtype', None)} {getattr(images, 'shape', None)}")
    if training.local_epochs < 1 or training.batch_size < 1:
        raise ValueError("local_epochs and batch_size must be at least 1")
    if training.optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {training.optimizer!r}")


def _make_step(training: TrainingSpec, size: int,
               kernels: ModuleType) -> Callable[[np.ndarray, np.ndarray], None]:
    """An in-place optimizer step with its own fresh state."""
    lr, wd = training.learning_rate, training.weight_decay
    if training.optimizer == "sgd":
        velocity = np.zeros(size, dtype=np.float32)

        def sgd(params: np.ndarray, grad: np.ndarray) -> None:
            kernels.sgd_momentum_step(params, grad, velocity, lr, training.momentum, wd)

        return sgd
    m = np.zeros(size, dtype=np.float32)
    v = np.zeros(size, dtype=np.float32)
    t = 0

    def adam(params: np.ndarray, grad: np.ndarray) -> None:
        nonlocal t
        t += 1
        kernels.adam_step(params, grad, m, v, lr, ADAM_BETA1, ADAM_BETA2, ADAM_EPS, t, wd)

    return adam


@dataclass
class DpSgd:
    """Per-example clipping and noise for DP-SGD (see `train_local`)."""

    clip: float
    sigma: float
    noise: Callable[[int, float], np.ndarray]  # (n, std) -> n normal draws of that std
    clipped: int = 0  # examples whose gradient was scaled down (reported, never silent)


def _private_gradient(layout: Layout, p: np.ndarray, x: np.ndarray, y: np.ndarray,
                      kernels: ModuleType, images: np.ndarray | None, dp: DpSgd
                      ) -> tuple[float, np.ndarray]:
    """The noisy mean of the batch's clipped per-example gradients (one backward pass per
    example: the models here are small, and every kind gets DP-SGD without its own code)."""
    rows = np.empty((x.shape[0], p.size), dtype=np.float32)
    total = 0.0
    for i in range(x.shape[0]):
        img = None if images is None else images[i:i + 1]
        loss, rows[i] = loss_and_grad(layout, p, x[i:i + 1], y[i:i + 1], kernels, img)
        total += loss
    summed, clipped = kernels.clip_rows_sum(rows, dp.clip)
    dp.clipped += int(clipped)
    noise = dp.noise(p.size, dp.sigma * dp.clip)
    return total / x.shape[0], ((summed + noise) / x.shape[0]).astype(np.float32)


def train_local(layout: Layout, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                training: TrainingSpec, *, seed: int, kernels: ModuleType,
                first_step_callback: Callable[[], None] | None = None,
                step_callback: Callable[[], None] | None = None,
                images: np.ndarray | None = None, proximal_mu: float = 0.0,
                dp_sgd: DpSgd | None = None) -> TrainResult:
    """Train from `params` on (x, y) for `training.local_epochs` epochs of shuffled batches.

    `images` (float32 [n, depth, h, w], row i belonging to x[i]) is required by a cnn_fused
    layout and refused otherwise; each batch takes the same shuffled rows of all three.

    `first_step_callback` runs once right after the first optimizer step, so the daemon can
    measure "process start to first training step" (JIT and data loading included);
    `step_callback` after every step (the daemon's watchdog beat and stop check: it may raise).
    `proximal_mu` > 0 adds FedProx's proximal term mu/2 ||w - params||^2 to the local loss, so
    the local model stays near the global one it started from (heterogeneous sites).
    `dp_sgd`: sample-level DP (Abadi et al., CCS 2016): each example's gradient is clipped to
    `clip` (kernel `clip_rows_sum`), Gaussian noise `sigma` x `clip` (from `dp_sgd.noise`,
    a cryptographic source at the site) is added to the batch's sum, and the sum divided by
    the batch size. Batches are the shuffled fixed-size ones; the accountant treats them as
    Poisson samples at rate batch/rows, as Opacus does by default (docs/privacy.md).
    """
    _check_inputs(layout, params, x, y, training, images)
    start = time.perf_counter()
    p = np.array(params, dtype=np.float32, copy=True, order="C")
    step = _make_step(training, layout.size, kernels)
    rng = np.random.default_rng(seed)
    n, bs = x.shape[0], training.batch_size
    steps = 0
    mean_loss = float("nan")
    for _epoch in range(training.local_epochs):
        order = rng.permutation(n)
        total = 0.0
        for lo in range(0, n, bs):
            idx = order[lo:lo + bs]
            batch_images = None if images is None else images[idx]
            if dp_sgd is None:
                loss, grad = loss_and_grad(layout, p, x[idx], y[idx], kernels, batch_images)
            else:
                loss, grad = _private_gradient(layout, p, x[idx], y[idx], kernels,
                                               batch_images, dp_sgd)
            if proximal_mu > 0:
                kernels.add_proximal(grad, p, params, proximal_mu)
            step(p, grad)
            steps += 1
            if steps == 1 and first_step_callback is not None:
                first_step_callback()
            if step_callback is not None:
                step_callback()
            total += loss * idx.size
        mean_loss = total / n
    return TrainResult(params=p, n_samples=n, mean_loss=mean_loss, steps=steps,
                       seconds=time.perf_counter() - start)

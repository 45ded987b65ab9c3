"""DP-SGD in the trainer: per-example clipping (kernel clip_rows_sum) and noise on each step."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from agent.config import ModelSpec, TrainingSpec
from agent.learn.layout import build_layout, init_params
from agent.learn.trainer import DpSgd, train_local

K = kernels.get_backend("cpu")


def _seeded(seed: int):
    """A seeded stand-in for the site's cryptographic noise: same draws every run."""
    rng = np.random.default_rng(seed)
    return lambda n, std: (rng.standard_normal(n) * std).astype(np.float32)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    layout = build_layout(ModelSpec("mlp", hidden=(8,)), 5, None)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.standard_normal(64) > 0).astype(np.float32)
    return layout, init_params(layout, seed), x, y


def test_without_clipping_or_noise_dp_sgd_is_plain_sgd():
    layout, params, x, y = _problem()
    spec = TrainingSpec(local_epochs=2, batch_size=16, learning_rate=0.1, momentum=0.0)
    plain = train_local(layout, params, x, y, spec, seed=3, kernels=K)
    dp = DpSgd(clip=1e9, sigma=0.0, noise=_seeded(0))
    private = train_local(layout, params, x, y, spec, seed=3, kernels=K, dp_sgd=dp)
    np.testing.assert_allclose(private.params, plain.params, rtol=1e-4, atol=1e-6)
    assert dp.clipped == 0


def test_every_step_moves_the_model_by_at_most_lr_times_clip_without_noise():
    layout, params, x, y = _problem(1)
    clip, lr = 0.05, 0.5
    spec = TrainingSpec(local_epochs=1, batch_size=64, learning_rate=lr, momentum=0.0)
    dp = DpSgd(clip=clip, sigma=0.0, noise=_seeded(0))
    r = train_local(layout, params, x, y, spec, seed=0, kernels=K, dp_sgd=dp)
    assert r.steps == 1
    assert np.linalg.norm(r.params - params) <= lr * clip * (1 + 1e-5)
    assert dp.clipped > 0  # gradients of this size are clipped: the bound is really tested


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_the_noise_on_a_step_has_std_sigma_clip_over_batch(sigma):
    layout, params, x, y = _problem(2)
    clip, lr, batch = 0.1, 1.0, 64
    spec = TrainingSpec(local_epochs=1, batch_size=batch, learning_rate=lr, momentum=0.0)
    quiet = train_local(layout, params, x, y, spec, seed=0, kernels=K,
                        dp_sgd=DpSgd(clip, 0.0, _seeded(0)))
    noisy = train_local(layout, params, x, y, spec, seed=0, kernels=K,
                        dp_sgd=DpSgd(clip, sigma, _seeded(7)))
    noise = (noisy.params - quiet.params) / lr
    # std of layout.size draws; 4 sigma of the estimate's relative error is ~ 4/sqrt(2 n)
    want = sigma * clip / batch
    assert abs(noise.std() / want - 1) < 4 / np.sqrt(2 * layout.size)

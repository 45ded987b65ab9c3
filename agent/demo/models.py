"""Seeded, untrained models of the demo's plan, and inputs for them.

Tests and benchmarks of the exported model (ONNX export, scoring, distribution, SRs) need a
model of the demo's features and grid without running a federation: seeded parameters with a
seeded perturbation (non-zero biases), plausible standardisation, and the output bias centred
on a calibration batch so probabilities are spread out (parity on saturated probabilities would
prove nothing). `project_proba` is the project's own scoring path they compare against.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import ModuleType

import numpy as np

from agent.config import ModelSpec, Plan, plan_from_dict, plan_to_toml_dict
from agent.demo.imaging import imaging_plans
from agent.ingest.tables import encoded_columns, numeric_column_indices
from agent.learn import stack
from agent.learn.layout import build_layout, init_params
from agent.learn.modelfile import SavedModel
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization

# Typical values of the demo's numeric features: the models' standardisation means.
MEANS = {"age": 72.0, "nihss": 9.0, "onset_to_door_min": 140.0, "glucose_mmol_l": 7.0,
         "systolic_bp": 150.0, "prestroke_mrs": 1.0}


def demo_model(kind: str = "cnn_fused", *, hidden: tuple[int, ...] = (), seed: int = 0,
               backend: ModuleType | None = None) -> SavedModel:
    """`logistic`, `mlp` (with `hidden`) on the demo's tables, or the demo's `cnn_fused` on
    tables + CT; centred with the kernel `backend` (default: the numpy reference)."""
    tables, fused = imaging_plans(["north", "south"], rounds=4, seed=seed)
    plan = fused if kind == "cnn_fused" else dataclasses.replace(
        tables, model=ModelSpec(kind, hidden))
    return seeded_model(plan, MEANS, seed=seed, backend=backend)


def seeded_model(plan: Plan, means: Mapping[str, float],
                 scales: Mapping[str, float] | None = None, *, seed: int = 0,
                 backend: ModuleType | None = None) -> SavedModel:
    """A model of any plan: its numeric features standardised with `means` and `scales`
    (default 0.3 x the mean), the image statistics (imaging plans) drawn around a plausible
    head, the output bias centred on a calibration batch."""
    columns = encoded_columns(plan.features)
    img = plan.imaging
    image = (img.depth, img.size, img.size) if plan.model.conv_channels and img else None
    layout = build_layout(plan.model, len(columns), image)
    rng = np.random.default_rng(100 + seed)
    params = (init_params(layout, seed) + rng.normal(0.0, 0.1, layout.size)).astype(np.float32)
    mean, scale = np.zeros(len(columns)), np.ones(len(columns))
    for i in numeric_column_indices(plan.features):
        name = columns[i]
        mean[i] = means[name]
        scale[i] = scales[name] if scales is not None else 0.3 * means[name]
    norm = None
    if image is not None:
        voxels = math.prod(image)
        norm = np.concatenate([rng.uniform(0.2, 0.6, voxels),
                               rng.uniform(0.05, 0.3, voxels)]).astype(np.float32)
    saved = SavedModel(layout=layout, params=params, columns=columns, mean=mean, scale=scale,
                       plan=plan_to_toml_dict(plan), image_norm=norm)
    if backend is None:
        import kernels.reference as backend
    p = project_proba(saved, backend, encoded_rows(saved, 16, 900 + seed),
                      grid_images(saved, 16, 800 + seed) if image else None)
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    layout.views(params)[stack.dense_layers(layout)[-1][1]] -= np.float32(
        np.median(np.log(p) - np.log1p(-p)))
    return saved


def encoded_rows(saved: SavedModel, n: int, seed: int) -> np.ndarray:
    """Rows as agent.ingest.tables encodes them: numeric values around the model's means (10 %
    missing = NaN), one-hot categoricals (some all zeros = missing)."""
    features = plan_from_dict(saved.plan).features
    rng = np.random.default_rng(seed)
    x = np.zeros((n, len(saved.columns)), dtype=np.float32)
    pos = 0
    for f in features:
        if f.type == "categorical":
            pick = rng.integers(-1, len(f.levels), n)  # -1: missing, all zeros
            for j in range(len(f.levels)):
                x[:, pos + j] = pick == j
            pos += len(f.levels)
        else:
            x[:, pos] = saved.mean[pos] + 1.5 * saved.scale[pos] * rng.standard_normal(n)
            x[rng.random(n) < 0.1, pos] = np.nan
            pos += 1
    return x


def grid_images(saved: SavedModel, n: int, seed: int) -> np.ndarray:
    """Windowed (0..1) images on the plan's grid, spread around the federation's mean."""
    rng = np.random.default_rng(seed)
    mean, scale = (a.reshape(saved.layout.image_shape) for a in np.split(saved.image_norm, 2))
    noise = rng.standard_normal((n, *saved.layout.image_shape))
    return np.clip(mean + scale * noise, 0.0, 1.0).astype(np.float32)


def project_proba(saved: SavedModel, kernels: ModuleType, x: np.ndarray,
                  images: np.ndarray | None) -> np.ndarray:
    """The project's path: standardise the rows (and the images, per voxel), predict_proba."""
    xs = apply_standardization(x, saved.mean, saved.scale)
    std = None
    if images is not None:
        mean, scale = np.split(saved.image_norm, 2)
        shape = images.shape[1:]
        std = ((images - mean.reshape(shape)) / scale.reshape(shape)).astype(np.float32)
    return predict_proba(saved.layout, saved.params, xs, kernels, std)

"""The two baselines the demo prints beside the federated model, on the same data.

Site alone: each hospital trains the same model on its own training rows only, standardised
with its own statistics. Pooled: one model on everyone's training rows together (what no
hospital may do in reality, hence the ceiling). Both get as many epochs as the federation ran
(rounds x local epochs) and score on the common test set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from agent.config import Plan
from agent.federation.site import split_rows
from agent.ingest.tables import EncodedTable, load_table
from agent.learn import metrics
from agent.learn.layout import build_layout, init_params
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization, local_moments, standardizer
from agent.learn.trainer import train_local


def train_and_score(plan: Plan, x: np.ndarray, y: np.ndarray, test: EncodedTable,
                    kernels: ModuleType) -> float:
    """Train centrally on (x, y) with the plan's model and budget; AUC on the test table."""
    numeric = test.numeric_columns
    mean, scale = standardizer(local_moments(x), numeric)
    layout = build_layout(plan.model, x.shape[1])
    training = dataclasses.replace(plan.training,
                                   local_epochs=plan.rounds * plan.training.local_epochs)
    result = train_local(layout, init_params(layout, plan.seed),
                         apply_standardization(x, mean, scale), y, training, seed=plan.seed,
                         kernels=kernels)
    p = predict_proba(layout, result.params, apply_standardization(test.x, mean, scale), kernels)
    return float(metrics.roc_auc(test.y, p))


def score_alone_and_pooled(plan: Plan, tables: Sequence[Path], test: EncodedTable,
                           kernels: ModuleType, *, holdout_fraction: float = 0.2,
                           split_seed: int = 0) -> tuple[list[float], float]:
    xs, ys, alone = [], [], []
    for path in tables:
        t = load_table(path, plan.features, plan.target, plan.missing)
        train, _holdout = split_rows(t.x.shape[0], holdout_fraction, split_seed)
        xs.append(t.x[train])
        ys.append(t.y[train])
        alone.append(train_and_score(plan, xs[-1], ys[-1], test, kernels))
    pooled = train_and_score(plan, np.concatenate(xs), np.concatenate(ys), test, kernels)
    return alone, pooled

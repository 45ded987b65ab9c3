"""Strategies in whole federations: real Mosquitto, sites as `fedsilo site run` processes."""

from __future__ import annotations

import dataclasses
import json

import pytest

import kernels
from agent.config import StrategySpec
from agent.federation.coordinator import Stopped
from agent.ingest.tables import load_table
from agent.learn import metrics
from agent.learn.modelfile import load_model
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization
from tests.fedharness import CoordinatorThread, breast_cancer_sites, stop_all
from tests.test_federation import launch, plan_for

pytestmark = pytest.mark.integration
NAMES = ["north", "south", "east"]


def _test_auc(test_csv, features, model_dir) -> float:
    test = load_table(test_csv, features, "label", "mean")
    model = load_model(model_dir)
    p = predict_proba(model.layout, model.params,
                      apply_standardization(test.x, model.mean, model.scale),
                      kernels.get_backend("auto"))
    return metrics.roc_auc(test.y, p)


def test_fedadam_resumes_its_server_optimizer_from_the_checkpoint(tmp_path, mosquitto):
    tables, test_csv, features = breast_cancer_sites(tmp_path / "data")
    plan = dataclasses.replace(plan_for(features, NAMES, rounds=8),
                               strategy=StrategySpec(name="fedadam", server_lr=0.05))
    procs = launch(tmp_path, mosquitto.port, NAMES, tables)
    state = tmp_path / "coord"
    seen: list[dict] = []

    def stop_after_three(record):
        seen.append(record)
        if record["round"] == 3:
            first.coordinator.stop_event.set()

    first = CoordinatorThread(plan, mosquitto.port, state, on_round=stop_after_three).start()
    with pytest.raises(Stopped):
        first.join(timeout=120)
    checkpoint = json.loads((state / "checkpoint.json").read_text())
    assert set(checkpoint["strategy_state"]) == {"m", "v"}
    m_saved = first.coordinator.strategy.m.copy()
    again = CoordinatorThread(plan, mosquitto.port, state, on_round=seen.append)
    assert (again.coordinator.strategy.m == 0).all()  # before it loads its checkpoint
    final = again.start().join(timeout=120)
    assert [r["round"] for r in seen] == list(range(1, 9))
    assert all(r["strategy"] == "fedadam" for r in seen)
    assert final["sites"] == sorted(NAMES)
    assert stop_all(procs) == [0, 0, 0]
    # the resumed optimizer went on from the saved moments, not from zero
    assert not (again.coordinator.strategy.m == m_saved).all()
    assert _test_auc(test_csv, features, state / "model") > 0.95


def test_a_sites_weight_is_capped_by_the_plan(tmp_path, mosquitto):
    tables, test_csv, features = breast_cancer_sites(tmp_path / "data")
    plan = dataclasses.replace(plan_for(features, NAMES, rounds=2),
                               strategy=StrategySpec(max_weight_fraction=0.34))
    procs = launch(tmp_path, mosquitto.port, NAMES, tables)
    seen: list[dict] = []
    CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                      on_round=seen.append).start().join(timeout=120)
    assert stop_all(procs) == [0, 0, 0]
    for record in seen:
        weights = {s: v["weight"] for s, v in record["per_site"].items()}
        claims = {s: v["n_samples"] for s, v in record["per_site"].items()}
        total = sum(weights.values())
        assert all(w <= 0.34 * total + 1e-6 for w in weights.values()), weights
        assert all(weights[s] <= claims[s] for s in weights)
        assert weights != claims  # the skewed split has one site above a third


def test_fedprox_federation_trains_as_well(tmp_path, mosquitto):
    tables, test_csv, features = breast_cancer_sites(tmp_path / "data")
    plan = dataclasses.replace(plan_for(features, NAMES, rounds=8),
                               strategy=StrategySpec(name="fedprox", mu=0.1))
    procs = launch(tmp_path, mosquitto.port, NAMES, tables)
    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord").start().join(120)
    assert stop_all(procs) == [0, 0, 0]
    assert final["sites"] == sorted(NAMES)
    assert _test_auc(test_csv, features, tmp_path / "coord" / "model") > 0.95

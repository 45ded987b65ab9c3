"""The model-kind registry: a kind fedsilo does not ship, added as one entry, works end to end.

`tests/quadratic_kind.py` registers `quadratic` without touching fedsilo's modules; these tests
show the plan, the layout (build, wire form, digest), initial parameters, the trainer, scoring
and a whole federation over a real Mosquitto all take it, and that the built-in kinds are what
they were before the registry existed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels
from agent.config import ModelSpec, Plan, TrainingSpec, plan_from_dict, plan_to_toml_dict
from agent.errors import ConfigError, ProtocolError
from agent.ingest.tables import load_table
from agent.learn import kinds, metrics
from agent.learn.layout import Layout, build_layout, init_params
from agent.learn.models import loss_and_grad, predict_proba
from agent.learn.predict import load_scoring_model
from agent.learn.standardize import apply_standardization
from agent.learn.trainer import train_local
from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_site,
    stop_all,
    write_site_config,
)

REF = kernels.get_backend("reference")
REPO = str(Path(__file__).resolve().parent.parent)
FED = "kinds-test"


@pytest.fixture
def quadratic():
    """The test kind registered for one test, then removed again."""
    from tests.quadratic_kind import QUADRATIC
    if QUADRATIC.name not in kinds.kind_names():
        kinds.register_kind(QUADRATIC)
    yield QUADRATIC
    kinds.unregister_kind("quadratic")


def plugin_package(directory: Path, target: str = "tests.quadratic_kind:QUADRATIC") -> Path:
    """The metadata an installed package `fedsilo-quadratic` leaves on sys.path: one entry
    point naming its kind. Returns the directory to put on PYTHONPATH."""
    info = directory / "fedsilo_quadratic-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedsilo-quadratic\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(f"[fedsilo.model_kinds]\nquadratic = {target}\n")
    return directory


def load_model_history(state_dir):
    import json
    doc = json.loads((state_dir / "metrics.json").read_text())
    return [r for r in doc["rounds"] if "round" in r]


def _plan(features, sites=("north", "south"), rounds=4, kind="quadratic") -> Plan:
    return Plan(federation=FED, sites=tuple(sites), rounds=rounds, min_sites=len(sites),
                round_deadline_s=30.0, target="label", features=features,
                model=ModelSpec(kind),
                training=TrainingSpec(local_epochs=1, batch_size=16, learning_rate=0.05,
                                      optimizer="sgd", momentum=0.9))


# Digests and seeded initial parameters of the built-in kinds, computed with the code before the
# registry existed: checkpoints, saved models and sites of the earlier version still agree.
BUILT_IN = [
    (ModelSpec("logistic"), None,
     "85241a6561cd54f08c832516ab97aa0bb720f0df512c19a50dfcc65556baa5ba", "35d75a2d62af94e8"),
    (ModelSpec("mlp", hidden=(8, 4)), None,
     "43b46a4a98313819baa5600b1b6844d793bb02e6f43ac16f3da0e75518829eac", "3da1c78a94cc32a8"),
    (ModelSpec("cnn_fused", hidden=(8,), conv_channels=(4, 8)), (8, 32, 32),
     "72169f9bf3aa67db8033a89216c102d8860a5495c164f914deab5c27448948ba", "b919450dc3877195"),
]


@pytest.mark.parametrize(("spec", "image", "digest", "init_sha"), BUILT_IN,
                         ids=lambda v: getattr(v, "kind", None))
def test_built_in_kinds_keep_their_layout_digests_and_initial_parameters(spec, image, digest,
                                                                         init_sha):
    assert kinds.kind_names()[:3] == ("logistic", "mlp", "cnn_fused")
    layout = build_layout(spec, 5, image)
    assert layout.digest() == digest
    assert hashlib.sha256(init_params(layout, 3).tobytes()).hexdigest()[:16] == init_sha
    assert Layout.from_dict(layout.to_dict()) == layout


def test_an_unknown_kind_is_a_config_error_listing_the_registered_ones(tmp_path):
    _tables, _test, features = breast_cancer_sites(tmp_path)
    doc = plan_to_toml_dict(_plan(features, kind="logistic"))
    doc["model"]["kind"] = "quadratic"
    with pytest.raises(ConfigError) as info:
        plan_from_dict(doc)
    assert info.value.key == "model.kind"
    assert "logistic, mlp, cnn_fused" in info.value.problem and "quadratic" in info.value.problem
    with pytest.raises(ProtocolError) as wire:
        Layout.from_dict({"version": 1, "kind": "quadratic", "tensors": []})
    assert "unknown model kind 'quadratic'" in str(wire.value)


def test_a_registered_kind_is_taken_by_plan_layout_and_wire(tmp_path, quadratic):
    _tables, _test, features = breast_cancer_sites(tmp_path)
    doc = plan_to_toml_dict(_plan(features))
    plan = plan_from_dict(doc)
    assert plan.model.kind == "quadratic"
    doc["model"]["hidden"] = [4]
    with pytest.raises(ConfigError) as info:
        plan_from_dict(doc)
    assert info.value.key == "model.hidden" and "no hidden" in info.value.problem

    layout = build_layout(plan.model, len(features))
    assert [t.name for t in layout.tensors] == ["w", "v", "b"]
    assert layout.size == 2 * len(features) + 1 and layout.n_inputs == len(features)
    again = Layout.from_dict(layout.to_dict())
    assert again == layout and again.digest() == layout.digest()
    broken = layout.to_dict()
    broken["tensors"] = broken["tensors"][:1] + broken["tensors"][2:]
    broken["tensors"][1]["offset"] = len(features)
    with pytest.raises(ProtocolError, match="quadratic layout holds"):
        Layout.from_dict(broken)
    p0 = init_params(layout, 7)
    views = layout.views(p0)
    assert np.any(views["w"] != 0) and not np.any(views["v"]) and not views["b"][0]
    np.testing.assert_array_equal(p0, init_params(layout, 7))


def test_the_kinds_gradient_and_training_run_through_fedsilos_entry_points(quadratic):
    rng = np.random.default_rng(0)
    layout = build_layout(ModelSpec("quadratic"), 3)
    x = rng.normal(size=(64, 3))
    y = ((x[:, 0] ** 2 + 0.3 * x[:, 1]) > 1.0).astype(np.float64)
    p = rng.normal(size=layout.size) * 0.1
    _loss, grad = loss_and_grad(layout, p, x, y, REF)
    eps, fd = 1e-6, np.empty_like(p)
    for i in range(p.size):
        d = np.zeros_like(p)
        d[i] = eps
        fd[i] = (loss_and_grad(layout, p + d, x, y, REF)[0]
                 - loss_and_grad(layout, p - d, x, y, REF)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="reads no images"):
        predict_proba(layout, p, x, REF, images=np.zeros((64, 1, 4, 4)))

    k = kernels.get_backend("auto")
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    start = init_params(layout, 0)
    result = train_local(layout, start, x32, y32,
                         TrainingSpec(local_epochs=30, batch_size=16, learning_rate=0.1),
                         seed=0, kernels=k)
    auc_before = metrics.roc_auc(y32, predict_proba(layout, start, x32, k))
    auc_after = metrics.roc_auc(y32, predict_proba(layout, result.params, x32, k))
    # the outcome bends with x0^2: the kind's own v term learns it
    assert auc_after > 0.95 > auc_before, (auc_before, auc_after)


def test_a_federation_trains_a_kind_added_as_one_entry(tmp_path, mosquitto, quadratic):
    tables, test_csv, features = breast_cancer_sites(tmp_path / "data")
    names = ["east", "north", "south"]
    plan = _plan(features, names)
    # each site is the real `fedsilo site run`, on a machine where the consortium's package
    # (here only its metadata, naming tests.quadratic_kind) is installed
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_package(tmp_path / "pkg")), REPO])}
    procs = [start_site(write_site_config(tmp_path / "sites", name, FED, mosquitto.port, table),
                        tmp_path / f"{name}.log", env=env)
             for name, table in zip(names, tables, strict=True)]
    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord").start().join(180)
    assert stop_all(procs) == [0, 0, 0]
    assert final["sites"] == names
    history = [r["round"] for r in load_model_history(tmp_path / "coord")]
    assert history == list(range(1, plan.rounds + 1))

    model, saved_plan = load_scoring_model(tmp_path / "coord" / "model")
    assert model.layout.kind == "quadratic" and saved_plan.model.kind == "quadratic"
    assert np.any(model.layout.views(model.params)["v"] != 0)  # the square terms were trained
    test = load_table(test_csv, features, "label", "mean")
    p = predict_proba(model.layout, model.params,
                      apply_standardization(test.x, model.mean, model.scale),
                      kernels.get_backend("auto"))
    assert metrics.roc_auc(test.y, p) > 0.95


@pytest.mark.parametrize(("target", "problem"), [
    ("tests.no_such_module:KIND", "cannot be loaded: ModuleNotFoundError"),
    ("tests.quadratic_kind:NAME", "must be a ModelKind named 'quadratic', got str"),
])
def test_a_broken_kind_plugin_is_a_one_line_config_error(tmp_path, target, problem):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(plugin_package(tmp_path, target)), REPO])}
    out = subprocess.run([sys.executable, "-m", "agent", "predict", "--model", str(tmp_path),
                          "--table", str(tmp_path / "none.csv")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "entry point quadratic" in lines[0] and problem in lines[0], lines

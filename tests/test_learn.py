"""Layouts, gradients, the local trainer and the metrics.

Gradients are checked against central finite differences in float64 (the reference backend keeps
the input dtype), so a wrong formula fails by orders of magnitude more than the tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

import kernels
from agent.config import ModelSpec, TrainingSpec
from agent.errors import ProtocolError
from agent.learn import stack
from agent.learn.layout import Layout, TensorSpec, build_layout, init_params
from agent.learn.metrics import accuracy, log_loss, roc_auc
from agent.learn.models import loss_and_grad, predict_proba
from agent.learn.trainer import TrainResult, train_local

REF = kernels.get_backend("reference")
USABLE = [n for n, reason in kernels.available_backends().items() if reason is None]
LOGISTIC = ModelSpec("logistic")
MLP2 = ModelSpec("mlp", (6, 4))


def problem(seed=0, n=240, d=4):
    """A linearly separable binary problem with a margin (float32, like production)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = np.array([1.5, -2.0, 1.0, 0.5][:d])
    s = x @ w
    keep = np.abs(s) > 0.3
    return x[keep], (s[keep] > 0).astype(np.float32)


# ---------------------------------------------------------------------------- layout


def test_build_layout_logistic():
    lay = build_layout(LOGISTIC, 5)
    assert lay.tensors == (TensorSpec("w", (5, 1), 0), TensorSpec("b", (1,), 5))
    assert lay.size == 6 and lay.n_inputs == 5


def test_build_layout_mlp():
    lay = build_layout(ModelSpec("mlp", (8, 3)), 5)
    assert [(t.name, t.shape, t.offset) for t in lay.tensors] == [
        ("dense0.w", (5, 8), 0), ("dense0.b", (8,), 40), ("dense1.w", (8, 3), 48),
        ("dense1.b", (3,), 72), ("dense2.w", (3, 1), 75), ("dense2.b", (1,), 78)]
    assert lay.size == 79
    assert stack.dense_layers(lay)[-1] == ("dense2.w", "dense2.b")


@pytest.mark.parametrize("model,n", [(ModelSpec("mlp", ()), 3), (ModelSpec("logistic", (2,)), 3),
                                     (ModelSpec("tree"), 3), (LOGISTIC, 0)])
def test_build_layout_rejects(model, n):
    with pytest.raises(ValueError):
        build_layout(model, n)


def test_views_are_views():
    lay = build_layout(MLP2, 3)
    params = np.zeros(lay.size, np.float32)
    views = lay.views(params)
    assert views["dense1.w"].shape == (6, 4)
    views["dense1.w"][2, 3] = 7.0
    views["dense2.b"][0] = -1.0
    offset = lay.tensors[2].offset
    assert params[offset + 2 * 4 + 3] == 7.0 and params[-1] == -1.0
    assert np.count_nonzero(params) == 2
    assert all(np.shares_memory(v, params) for v in views.values())
    with pytest.raises(ValueError):
        lay.views(np.zeros(lay.size + 1, np.float32))


def test_layout_round_trip_and_digest():
    lay = build_layout(MLP2, 3)
    wire = json.loads(json.dumps(lay.to_dict()))
    back = Layout.from_dict(wire)
    assert back == lay and back.digest() == lay.digest()
    canonical = json.dumps(lay.to_dict(), sort_keys=True, separators=(",", ":"))
    assert lay.digest() == hashlib.sha256(canonical.encode()).hexdigest()
    assert lay.digest() != build_layout(MLP2, 4).digest()
    assert lay.digest() != build_layout(ModelSpec("mlp", (6, 5)), 3).digest()


def _good() -> dict:
    return build_layout(ModelSpec("mlp", (2,)), 3).to_dict()


def _mutate(path, value):
    d = _good()
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


_DELETE = object()
BAD_LAYOUTS = {
    "not a dict": [1, 2],
    "missing kind": _mutate(("kind",), _DELETE),
    "extra key": {**_good(), "extra": 1},
    "version 2": _mutate(("version",), 2),
    "version as string": _mutate(("version",), "1"),
    "unknown kind": _mutate(("kind",), "tree"),
    "tensors not list": _mutate(("tensors",), {"a": 1}),
    "no tensors": _mutate(("tensors",), []),
    "tensor not dict": _mutate(("tensors", 0), "dense0.w"),
    "name not str": _mutate(("tensors", 0, "name"), 5),
    "bad name": _mutate(("tensors", 0, "name"), "../etc"),
    "duplicate name": _mutate(("tensors", 2, "name"), "dense0.w"),
    "shape not list": _mutate(("tensors", 0, "shape"), 6),
    "zero dim": _mutate(("tensors", 0, "shape"), [3, 0]),
    "negative dim": _mutate(("tensors", 0, "shape"), [-3, 2]),
    "bool dim": _mutate(("tensors", 1, "shape"), [True, True]),
    "float offset": _mutate(("tensors", 1, "offset"), 6.0),
    "gap": _mutate(("tensors", 1, "offset"), 7),
    "overlap": _mutate(("tensors", 1, "offset"), 5),
    "huge": _mutate(("tensors", 0, "shape"), [3, 1 << 40]),
    "broken chain": _mutate(("tensors", 0, "shape"), [3, 5]),
    "two logits": _mutate(("tensors", 2, "shape"), [2, 2]),
    "logistic with mlp tensors": _mutate(("kind",), "logistic"),
    "mlp without hidden": {"version": 1, "kind": "mlp", "tensors": [
        {"name": "dense0.w", "shape": [3, 1], "offset": 0},
        {"name": "dense0.b", "shape": [1], "offset": 3}]},
}


@pytest.mark.parametrize("name", sorted(BAD_LAYOUTS))
def test_from_dict_rejects_malformed(name):
    with pytest.raises(ProtocolError) as info:
        Layout.from_dict(BAD_LAYOUTS[name])
    assert info.value.reason == "bad_layout"


def test_good_fixture_is_accepted():
    """The malformed cases above are each one edit away from this valid layout."""
    assert Layout.from_dict(_good()).size == 3 * 2 + 2 + 2 + 1


def test_init_params_seeded_and_scaled():
    lay = build_layout(ModelSpec("mlp", (300, 200)), 100)
    a, b = init_params(lay, 7), init_params(lay, 7)
    assert a.dtype == np.float32 and a.shape == (lay.size,)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, init_params(lay, 8))
    views = lay.views(a)
    for name in ("dense0.b", "dense1.b", "dense2.b"):
        assert not views[name].any()
    limits = {"dense0.w": math.sqrt(6 / 100), "dense1.w": math.sqrt(6 / 300),  # He
              "dense2.w": math.sqrt(6 / 201)}  # Glorot on the output layer
    for name, limit in limits.items():
        w = np.abs(views[name])
        assert w.max() <= limit and w.max() > 0.9 * limit
        assert w.mean() == pytest.approx(limit / 2, rel=0.1)


# ---------------------------------------------------------------------------- gradients


def _fd_grad(layout, params, x, y, eps=1e-6):
    grad = np.empty_like(params)
    for j in range(params.size):
        up, down = params.copy(), params.copy()
        up[j] += eps
        down[j] -= eps
        grad[j] = (loss_and_grad(layout, up, x, y, REF)[0]
                   - loss_and_grad(layout, down, x, y, REF)[0]) / (2 * eps)
    return grad


@pytest.mark.parametrize("model", [LOGISTIC, MLP2], ids=["logistic", "mlp-2-hidden"])
def test_gradient_matches_finite_differences(model):
    layout = build_layout(model, 3)
    rng = np.random.default_rng(11)
    params = init_params(layout, 3).astype(np.float64)
    params += rng.normal(0, 0.1, params.size)  # non-zero biases, so their gradients matter
    x = rng.standard_normal((9, 3))
    y = (rng.random(9) < 0.5).astype(np.float64)
    loss, grad = loss_and_grad(layout, params, x, y, REF)
    assert grad.dtype == np.float64 and grad.shape == params.shape
    assert loss > 0
    if model is LOGISTIC:  # (an MLP may have dead ReLUs, whose gradients are exactly 0)
        assert np.abs(grad).min() > 0
    np.testing.assert_allclose(grad, _fd_grad(layout, params, x, y), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("model", [LOGISTIC, MLP2], ids=["logistic", "mlp-2-hidden"])
def test_backend_gradient_matches_float64(name, model):
    k = kernels.get_backend(name)
    layout = build_layout(model, 4)
    params = init_params(layout, 5)
    x, y = problem(1, 50)
    loss, grad = loss_and_grad(layout, params, x, y, k)
    loss64, grad64 = loss_and_grad(layout, params.astype(np.float64), x.astype(np.float64),
                                   y.astype(np.float64), REF)
    assert grad.dtype == np.float32 and isinstance(loss, float)
    assert loss == pytest.approx(loss64, rel=1e-5)
    np.testing.assert_allclose(grad, grad64, rtol=1e-4, atol=1e-6)


def test_predict_proba_matches_numpy_forward():
    layout = build_layout(MLP2, 4)
    params = init_params(layout, 2)
    x, _ = problem(2, 30)
    v = {k: a.astype(np.float64) for k, a in layout.views(params).items()}
    h = np.maximum(x @ v["dense0.w"] + v["dense0.b"], 0)
    h = np.maximum(h @ v["dense1.w"] + v["dense1.b"], 0)
    want = 1 / (1 + np.exp(-(h @ v["dense2.w"] + v["dense2.b"])[:, 0]))
    for name in USABLE:
        p = predict_proba(layout, params, x, kernels.get_backend(name))
        assert p.dtype == np.float32 and p.shape == (x.shape[0],)
        np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-7)


def test_predict_proba_empty_batch():
    layout = build_layout(MLP2, 4)
    for name in USABLE:
        p = predict_proba(layout, init_params(layout, 0), np.empty((0, 4), np.float32),
                          kernels.get_backend(name))
        assert p.shape == (0,) and p.dtype == np.float32


def test_loss_and_grad_rejects_wrong_width():
    layout = build_layout(LOGISTIC, 4)
    with pytest.raises(ValueError, match="shape"):
        loss_and_grad(layout, init_params(layout, 0), np.ones((3, 5), np.float32),
                      np.ones(3, np.float32), REF)


# ---------------------------------------------------------------------------- trainer


SGD = TrainingSpec(local_epochs=15, batch_size=16, learning_rate=0.1, optimizer="sgd",
                   momentum=0.9, weight_decay=1e-4)
ADAM = TrainingSpec(local_epochs=15, batch_size=16, learning_rate=0.01, optimizer="adam",
                    weight_decay=1e-4)


@pytest.mark.parametrize("model,training", [(LOGISTIC, SGD), (MLP2, ADAM)],
                         ids=["logistic-sgd", "mlp-adam"])
def test_trainer_learns_separable_problem(model, training):
    x, y = problem(3)
    layout = build_layout(model, 4)
    params = init_params(layout, 0)
    k = kernels.get_backend("auto")
    before, _ = loss_and_grad(layout, params, x, y, k)
    res = train_local(layout, params, x, y, training, seed=1, kernels=k)
    after, _ = loss_and_grad(layout, res.params, x, y, k)
    assert isinstance(res, TrainResult)
    assert res.n_samples == x.shape[0]
    assert res.steps == training.local_epochs * math.ceil(x.shape[0] / training.batch_size)
    assert res.seconds >= 0 and res.params.dtype == np.float32
    assert after < 0.3 * before and res.mean_loss < 0.5 * before
    assert accuracy(y, predict_proba(layout, res.params, x, k)) > 0.95


def test_trainer_deterministic_and_pure():
    x, y = problem(4)
    layout = build_layout(MLP2, 4)
    params = init_params(layout, 0)
    saved = params.copy(), x.copy(), y.copy()
    k = kernels.get_backend("auto")
    short = TrainingSpec(local_epochs=2, batch_size=32, optimizer="sgd")
    a = train_local(layout, params, x, y, short, seed=5, kernels=k)
    b = train_local(layout, params, x, y, short, seed=5, kernels=k)
    c = train_local(layout, params, x, y, short, seed=6, kernels=k)
    # Bit-for-bit equality is the property under test here: same seed, same floats.
    np.testing.assert_array_equal(a.params, b.params)
    assert a.mean_loss == b.mean_loss
    assert not np.array_equal(a.params, c.params)  # another shuffle takes another path
    for before, now in zip(saved, (params, x, y), strict=True):
        np.testing.assert_array_equal(before, now)
    assert not np.shares_memory(a.params, params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 0  # type: ignore[misc]


def test_trainer_backends_agree():
    x, y = problem(5)
    layout = build_layout(MLP2, 4)
    params = init_params(layout, 1)
    short = TrainingSpec(local_epochs=1, batch_size=40, optimizer="adam", learning_rate=0.01)
    want = train_local(layout, params, x, y, short, seed=2, kernels=REF)
    for name in USABLE:
        got = train_local(layout, params, x, y, short, seed=2, kernels=kernels.get_backend(name))
        np.testing.assert_allclose(got.params, want.params, rtol=1e-4, atol=1e-5)
        assert got.mean_loss == pytest.approx(want.mean_loss, rel=1e-5)


def test_mean_loss_weights_batches_by_size():
    """With lr 0 the params stay put, so the epoch's mean loss is the full-data loss, even when
    the last batch is smaller than the others."""
    x, y = problem(8)
    assert x.shape[0] % 50 != 0
    layout = build_layout(MLP2, 4)
    params = init_params(layout, 3)
    frozen = TrainingSpec(local_epochs=1, batch_size=50, learning_rate=0.0, momentum=0.0)
    res = train_local(layout, params, x, y, frozen, seed=0, kernels=REF)
    np.testing.assert_array_equal(res.params, params)
    assert res.mean_loss == pytest.approx(loss_and_grad(layout, params, x, y, REF)[0], rel=1e-6)


def test_first_step_callback_called_once_after_first_step():
    x, y = problem(6)
    layout = build_layout(LOGISTIC, 4)
    params = init_params(layout, 0)
    calls = []
    train_local(layout, params, x, y, TrainingSpec(local_epochs=2, batch_size=8), seed=0,
                kernels=REF, first_step_callback=lambda: calls.append(1))
    assert calls == [1]


def test_trainer_rejects_bad_inputs():
    x, y = problem(7)
    layout = build_layout(LOGISTIC, 4)
    params = init_params(layout, 0)
    with pytest.raises(TypeError):
        train_local(layout, params.astype(np.float64), x, y, SGD, seed=0, kernels=REF)
    with pytest.raises(ValueError):
        train_local(layout, params, x, y[:-1], SGD, seed=0, kernels=REF)


# ---------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(12)
    y = (rng.random(500) < 0.3).astype(np.float32)
    prob = np.clip(np.round(0.3 * y + rng.random(500) * 0.7, 1), 0.01, 0.99)  # heavy ties
    assert len(np.unique(prob)) < 15
    assert roc_auc(y, prob) == pytest.approx(skm.roc_auc_score(y, prob), rel=1e-12)
    assert accuracy(y, prob) == pytest.approx(skm.accuracy_score(y, prob >= 0.5), rel=1e-12)
    assert accuracy(y, prob, 0.3) == pytest.approx(skm.accuracy_score(y, prob >= 0.3), rel=1e-12)
    assert log_loss(y, prob) == pytest.approx(skm.log_loss(y, prob), rel=1e-9)


def test_metrics_edge_cases():
    assert math.isnan(roc_auc(np.ones(5), np.linspace(0, 1, 5)))
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert log_loss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(1e-7))
    with pytest.raises(ValueError):
        roc_auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        accuracy(np.array([0, 1]), np.array([0.1]))


# ---------------------------------------------------------------------------- warm cache


@pytest.mark.skipif(kernels.available_backends()["cpu"] is not None, reason="no numba")
def test_warm_kernels_runs_every_cpu_kernel():
    from agent.learn.warm import warm_kernels

    seconds = warm_kernels()
    assert seconds > 0
    cpu = kernels.get_backend("cpu")
    for dispatcher in (cpu._dense_forward_serial, cpu._dense_forward_parallel,
                       cpu._adam_parallel, cpu._axpy_parallel, cpu._softmax_ce):
        assert dispatcher.signatures, dispatcher


def test_fedprox_term_keeps_local_training_near_the_global_model():
    """mu = 0 is plain local training, bit for bit; mu > 0 ends closer to where it started,
    and a larger mu moves less still."""
    import kernels as kreg
    from agent.config import ModelSpec, TrainingSpec
    from agent.learn.layout import build_layout, init_params
    from agent.learn.trainer import train_local

    k = kreg.get_backend("cpu")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    layout = build_layout(ModelSpec("mlp", hidden=(8,)), 6)
    start = init_params(layout, 1)
    tr = TrainingSpec(local_epochs=3, batch_size=16, learning_rate=0.1, optimizer="sgd",
                      momentum=0.0)
    moved = {}
    for mu in (0.0, 0.5, 5.0):  # lr x mu < 2: the pull itself stays stable
        out = train_local(layout, start, x, y, tr, seed=3, kernels=k, proximal_mu=mu)
        moved[mu] = float(np.linalg.norm(out.params - start))
    plain = train_local(layout, start, x, y, tr, seed=3, kernels=k)
    assert float(np.linalg.norm(plain.params - start)) == moved[0.0]
    assert moved[5.0] < moved[0.5] < moved[0.0]

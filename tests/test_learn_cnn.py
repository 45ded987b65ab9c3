"""The cnn_fused model: its layout on the flat vector, gradients, predictions and training.

Gradients are checked against central finite differences in float64 through the reference
kernels; fast backends are checked against that float64 result; the trainer must learn a toy
problem whose label lives only in the image.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import kernels
from agent.config import ModelSpec, TrainingSpec
from agent.errors import ProtocolError
from agent.learn import stack
from agent.learn.layout import Layout, build_layout, init_params
from agent.learn.metrics import accuracy
from agent.learn.models import loss_and_grad, predict_proba
from agent.learn.trainer import train_local

REF = kernels.get_backend("reference")
USABLE = [n for n, reason in kernels.available_backends().items() if reason is None]
CNN = ModelSpec("cnn_fused", hidden=(4,), conv_channels=(2, 3), kernel_size=3)
IMAGE = (2, 8, 8)


def batch(seed, n=5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(dtype)
    images = rng.uniform(0.05, 1.0, (n, *IMAGE)).astype(dtype)
    y = (rng.random(n) < 0.5).astype(dtype)
    y[:2] = [0, 1]
    return x, y, images


# ---------------------------------------------------------------------------- layout


def test_build_layout_cnn():
    lay = build_layout(CNN, 3, IMAGE)
    assert [(t.name, t.shape, t.offset) for t in lay.tensors] == [
        ("conv0.w", (2, 2, 3, 3), 0), ("conv0.b", (2,), 36), ("conv1.w", (3, 2, 3, 3), 38),
        ("conv1.b", (3,), 92), ("dense0.w", (6, 4), 95), ("dense0.b", (4,), 119),
        ("dense1.w", (4, 1), 123), ("dense1.b", (1,), 127)]
    assert lay.size == 128 and lay.n_inputs == 3 and stack.image_features(lay) == 3
    assert stack.kernel_size(lay) == 3 and lay.image_shape == IMAGE
    assert stack.conv_layers(lay) == (("conv0.w", "conv0.b"), ("conv1.w", "conv1.b"))
    no_hidden = build_layout(ModelSpec("cnn_fused", (), (4,), 5), 2, (1, 4, 4))
    assert stack.dense_layers(no_hidden) == (("dense0.w", "dense0.b"),)
    assert no_hidden.tensors[-2].shape == (6, 1)


@pytest.mark.parametrize("model,image", [
    (CNN, None), (ModelSpec("mlp", (3,)), IMAGE), (ModelSpec("mlp", (3,), (2,)), None),
    (CNN, (2, 6, 6)), (CNN, (2, 8)), (CNN, (2, 8.0, 8)), (ModelSpec("cnn_fused", (4,)), IMAGE),
    (ModelSpec("cnn_fused", (4,), (2,), 4), IMAGE), (CNN, (0, 8, 8))],
    ids=["no image", "mlp with image", "mlp with conv", "not divisible", "2-D image",
         "float side", "no conv", "even kernel", "zero depth"])
def test_build_layout_rejects_cnn_misuse(model, image):
    with pytest.raises(ValueError):
        build_layout(model, 3, image)


def test_cnn_round_trip_and_digest():
    lay = build_layout(CNN, 3, IMAGE)
    d = lay.to_dict()
    assert d["image_shape"] == [2, 8, 8] and d["kernel_size"] == 3
    back = Layout.from_dict(json.loads(json.dumps(d)))
    assert back == lay and back.digest() == lay.digest()
    assert lay.digest() != build_layout(CNN, 3, (2, 16, 16)).digest()  # same tensors, other grid
    # table models keep their old wire form (and so their digests)
    assert set(build_layout(ModelSpec("mlp", (3,)), 3).to_dict()) == {"version", "kind", "tensors"}


def _repack(d):
    offset = 0
    for t in d["tensors"]:
        t["offset"] = offset
        offset += math.prod(t["shape"])
    return d


def _cnn_dict(edit):
    d = copy.deepcopy(build_layout(CNN, 3, IMAGE).to_dict())
    edit(d)
    return _repack(d) if isinstance(d.get("tensors"), list) else d


def _shape(i, shape):
    def edit(d):
        d["tensors"][i]["shape"] = shape
    return edit


BAD_CNN = {  # each one defect away from a valid layout; match names the check that caught it
    "no image_shape": (lambda d: d.pop("image_shape"), "keys"),
    "no kernel_size": (lambda d: d.pop("kernel_size"), "keys"),
    "kernel_size disagrees": (lambda d: d.update(kernel_size=5), "disagrees"),
    "kernel_size bool": (lambda d: d.update(kernel_size=True), "integer"),
    "image_shape 2 long": (lambda d: d.update(image_shape=[8, 8]), "image_shape"),
    "image_shape float": (lambda d: d.update(image_shape=[2, 8.0, 8]), "integer"),
    "image_shape string": (lambda d: d.update(image_shape="2x8x8"), "image_shape"),
    "image huge": (lambda d: d.update(image_shape=[2, 1 << 20, 1 << 20]), "outside"),
    "image zero": (lambda d: d.update(image_shape=[2, 0, 8]), "outside"),
    "not divisible": (lambda d: d.update(image_shape=[2, 10, 8]), "divisible"),
    "depth mismatch": (lambda d: d.update(image_shape=[3, 8, 8]), "does not chain"),
    "conv chain broken": (_shape(2, [3, 4, 3, 3]), "does not chain"),
    "non-square kernel": (_shape(0, [2, 2, 3, 1]), "does not chain"),
    "conv 3-D": (_shape(0, [2, 2, 9]), "does not chain"),
    "conv bias": (_shape(1, [3]), "does not chain"),
    "no clinical input": (_shape(4, [3, 4]), "clinical"),
    "two logits": (_shape(6, [4, 2]), "does not chain"),
    "conv names swapped": (lambda d: d["tensors"].insert(0, d["tensors"].pop(2)), "tensors"),
    "no conv layers": (lambda d: d.update(tensors=d["tensors"][4:]), "conv layer"),
    "no dense layers": (lambda d: d.update(tensors=d["tensors"][:4]), "dense layer"),
    "image keys on mlp": (lambda d: d.update(kind="mlp"), "keys"),
    "huge kernel": (lambda d: d.update(kernel_size=17, tensors=[
        {**t, "shape": [*t["shape"][:2], 17, 17]} if t["name"].startswith("conv")
        and t["name"].endswith(".w") else t for t in d["tensors"]]), "at most"),
}


@pytest.mark.parametrize("name", sorted(BAD_CNN))
def test_from_dict_rejects_malformed_cnn(name):
    edit, match = BAD_CNN[name]
    with pytest.raises(ProtocolError, match=match) as info:
        Layout.from_dict(_cnn_dict(edit))
    assert info.value.reason == "bad_layout"


def test_init_params_cnn_he_uniform():
    lay = build_layout(ModelSpec("cnn_fused", (16,), (32, 64), 3), 3, (8, 16, 16))
    a = init_params(lay, 4)
    np.testing.assert_array_equal(a, init_params(lay, 4))
    v = lay.views(a)
    for name, fan_in in (("conv0.w", 8 * 9), ("conv1.w", 32 * 9)):
        limit = math.sqrt(6 / fan_in)
        w = np.abs(v[name])
        assert w.max() <= limit and w.max() > 0.9 * limit
        assert w.mean() == pytest.approx(limit / 2, rel=0.1)
    assert not v["conv0.b"].any() and not v["conv1.b"].any()


# ---------------------------------------------------------------------------- gradients


def test_cnn_gradient_matches_finite_differences():
    layout = build_layout(CNN, 3, IMAGE)
    rng = np.random.default_rng(21)
    params = init_params(layout, 3).astype(np.float64)
    params += rng.normal(0, 0.1, params.size)  # non-zero biases, so their gradients matter
    x, y, images = batch(22)
    loss, grad = loss_and_grad(layout, params, x, y, REF, images)
    assert grad.dtype == np.float64 and loss > 0
    fd = np.empty_like(params)
    eps = 1e-6
    for j in range(params.size):
        up, down = params.copy(), params.copy()
        up[j] += eps
        down[j] -= eps
        fd[j] = (loss_and_grad(layout, up, x, y, REF, images)[0]
                 - loss_and_grad(layout, down, x, y, REF, images)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
    gv = layout.views(grad)
    assert np.abs(gv["conv0.w"]).max() > 1e-4  # the image path really carries gradient


@pytest.mark.parametrize("name", USABLE)
def test_cnn_backend_gradient_matches_float64(name):
    k = kernels.get_backend(name)
    layout = build_layout(CNN, 3, IMAGE)
    params = init_params(layout, 5)
    x, y, images = batch(23, n=12, dtype=np.float32)
    loss, grad = loss_and_grad(layout, params, x, y, k, images)
    loss64, grad64 = loss_and_grad(layout, params.astype(np.float64), x.astype(np.float64),
                                   y.astype(np.float64), REF, images.astype(np.float64))
    assert grad.dtype == np.float32 and isinstance(loss, float)
    assert loss == pytest.approx(loss64, rel=1e-5)
    np.testing.assert_allclose(grad, grad64, rtol=1e-4, atol=1e-6)


def _numpy_forward(layout, params, x, images):
    """An independent float64 forward: the oracle conv, then numpy for the rest."""
    v = {k: a.astype(np.float64) for k, a in layout.views(params).items()}
    a = images.astype(np.float64)
    for w, b in stack.conv_layers(layout):
        a = np.maximum(REF.conv2d_forward(a, v[w], v[b]), 0)
        n, c, h, wd = a.shape
        a = a.reshape(n, c, h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    h = np.concatenate([a.mean(axis=(2, 3)), x], axis=1)
    h = np.maximum(h @ v["dense0.w"] + v["dense0.b"], 0)
    return 1 / (1 + np.exp(-(h @ v["dense1.w"] + v["dense1.b"])[:, 0]))


def test_cnn_predict_proba_matches_numpy_forward():
    layout = build_layout(CNN, 3, IMAGE)
    params = init_params(layout, 6)
    x, _, images = batch(24, n=7, dtype=np.float32)
    want = _numpy_forward(layout, params, x, images)
    for name in USABLE:
        p = predict_proba(layout, params, x, kernels.get_backend(name), images)
        assert p.dtype == np.float32 and p.shape == (7,)
        np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-7)
        empty = predict_proba(layout, params, x[:0], kernels.get_backend(name), images[:0])
        assert empty.shape == (0,)


def test_images_required_by_cnn_and_refused_elsewhere():
    cnn = build_layout(CNN, 3, IMAGE)
    mlp = build_layout(ModelSpec("mlp", (4,)), 3)
    x, y, images = batch(25, dtype=np.float32)
    with pytest.raises(ValueError, match="images"):
        loss_and_grad(cnn, init_params(cnn, 0), x, y, REF)
    with pytest.raises(ValueError, match="images"):
        predict_proba(cnn, init_params(cnn, 0), x, REF, images[:, :1])
    with pytest.raises(ValueError, match="images"):
        predict_proba(cnn, init_params(cnn, 0), x, REF, images.astype(np.float64))
    with pytest.raises(ValueError, match="reads no images"):
        loss_and_grad(mlp, init_params(mlp, 0), x, y, REF, images)
    with pytest.raises(ValueError, match="reads no images"):
        train_local(mlp, init_params(mlp, 0), x, y, TrainingSpec(), seed=0, kernels=REF,
                    images=images)
    with pytest.raises(ValueError, match="images"):
        train_local(cnn, init_params(cnn, 0), x, y, TrainingSpec(), seed=0, kernels=REF)


# ---------------------------------------------------------------------------- trainer


def brightness_problem(seed, n=96):
    """Label = is the scan bright; the clinical features are pure noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(y)
    level = np.where(y == 1, 0.65, 0.35)[:, None, None, None]
    images = (level + 0.15 * rng.standard_normal((n, *IMAGE))).astype(np.float32)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return x, y, images


ADAM = TrainingSpec(local_epochs=12, batch_size=16, learning_rate=0.03, optimizer="adam")


def test_trainer_learns_brightness_from_images():
    x, y, images = brightness_problem(7)
    layout = build_layout(CNN, 3, IMAGE)
    params = init_params(layout, 1)
    k = kernels.get_backend("auto")
    before, _ = loss_and_grad(layout, params, x, y, k, images)
    res = train_local(layout, params, x, y, ADAM, seed=3, kernels=k, images=images)
    after, _ = loss_and_grad(layout, res.params, x, y, k, images)
    assert res.steps == ADAM.local_epochs * math.ceil(x.shape[0] / ADAM.batch_size)
    assert after < 0.3 * before
    assert accuracy(y, predict_proba(layout, res.params, x, k, images)) > 0.9
    x2, y2, images2 = brightness_problem(70)  # unseen patients: it learned brightness, not rows
    assert accuracy(y2, predict_proba(layout, res.params, x2, k, images2)) > 0.9
    again = train_local(layout, params, x, y, ADAM, seed=3, kernels=k, images=images)
    other = train_local(layout, params, x, y, ADAM, seed=4, kernels=k, images=images)
    np.testing.assert_array_equal(again.params, res.params)  # same seed, same floats
    assert not np.array_equal(other.params, res.params)


def test_trainer_batches_images_with_their_rows():
    """lr 0 keeps params fixed, so the epoch's mean loss is the full-data loss only if every
    batch paired each image with its own row (a mismatch changes the loss)."""
    x, y, images = brightness_problem(8, n=45)
    layout = build_layout(CNN, 3, IMAGE)
    params = init_params(layout, 2)
    frozen = TrainingSpec(local_epochs=1, batch_size=10, learning_rate=0.0, momentum=0.0)
    res = train_local(layout, params, x, y, frozen, seed=0, kernels=REF, images=images)
    np.testing.assert_array_equal(res.params, params)
    full = loss_and_grad(layout, params, x, y, REF, images)[0]
    assert res.mean_loss == pytest.approx(full, rel=1e-6)
    shuffled = images[np.random.default_rng(0).permutation(45)]
    assert loss_and_grad(layout, params, x, y, REF, shuffled)[0] != pytest.approx(full, rel=1e-6)


# ---------------------------------------------------------------------------- warm cache


@pytest.mark.skipif(kernels.available_backends()["cpu"] is not None, reason="no numba")
def test_warm_kernels_compiles_imaging_and_conv_loops():
    """In a fresh process, warm_kernels alone leaves every serial and parallel loop compiled
    (preprocess_slice once per stored pixel dtype)."""
    code = (
        "from agent.learn.warm import warm_kernels\n"
        "from numba.core.registry import CPUDispatcher\n"
        "from kernels import cpu_conv, cpu_imaging\n"
        "warm_kernels()\n"
        "for m in (cpu_imaging, cpu_conv):\n"
        "    for name, f in sorted(vars(m).items()):\n"
        "        if isinstance(f, CPUDispatcher) and name.endswith(('_serial', '_parallel')):\n"
        "            print(name, len(f.signatures))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    counts = dict(line.split() for line in out.stdout.splitlines())
    assert len(counts) == 16, counts
    assert counts["_slice_serial"] == counts["_slice_parallel"] == "4"
    assert all(int(c) >= 1 for c in counts.values()), counts

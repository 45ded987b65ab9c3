"""ONNX export: onnxruntime on the exported graph, fed encoded but unstandardised rows (and raw
windowed images), gives the project's own forward pass on standardised inputs."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kernels.reference as REF
from agent.config import (
    FeatureSpec,
    ImagingSpec,
    ModelSpec,
    Plan,
    PrivacySpec,
    StrategySpec,
    plan_to_toml_dict,
)
from agent.demo.models import grid_images, seeded_model
from agent.demo.models import project_proba as demo_project_proba
from agent.federation.coordinator import plan_digest
from agent.ingest.tables import encoded_columns, numeric_column_indices
from agent.learn import onnx_export as ox
from agent.learn.modelfile import SavedModel, load_model, save_model
from agent.learn.standardize import apply_standardization

FEATURES = (
    FeatureSpec("age", "numeric", unit="years"),
    FeatureSpec("nihss", "numeric"),
    FeatureSpec("onset_to_door_min", "numeric"),
    FeatureSpec("admit_year", "numeric"),  # |mean| >> std: why the graph standardises in float64
    FeatureSpec("sex", "categorical", ("F", "M")),
    FeatureSpec("occlusion", "categorical", ("ICA", "M1", "M2")),
)
MEANS = {"age": 71.3, "nihss": 11.8, "onset_to_door_min": 94.0, "admit_year": 2019.6}
SCALES = {"age": 12.4, "nihss": 6.7, "onset_to_door_min": 51.0, "admit_year": 1.3}
IMAGING = ImagingSpec(depth=8, size=32)
CREATED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
TOL = 1e-5

MODELS = {
    "logistic": ModelSpec("logistic"),
    "mlp": ModelSpec("mlp", hidden=(16, 8)),
    "cnn_k3": ModelSpec("cnn_fused", hidden=(16,), conv_channels=(4, 8), kernel_size=3),
    "cnn_k5": ModelSpec("cnn_fused", hidden=(16,), conv_channels=(4, 8), kernel_size=5),
}


def make_plan(spec: ModelSpec, privacy: PrivacySpec | None = None) -> Plan:
    return Plan(federation="stroke-eu", sites=("north", "south", "east"), rounds=7, min_sites=2,
                round_deadline_s=60.0, target="mrs_good", features=FEATURES, model=spec,
                strategy=StrategySpec("fedavg"), seed=3,
                imaging=IMAGING if spec.conv_channels else None,
                privacy=privacy or PrivacySpec())


def make_saved(spec: ModelSpec, seed: int = 0, privacy: PrivacySpec | None = None
               ) -> tuple[SavedModel, Plan]:
    """A SavedModel built directly: seeded init plus a seeded perturbation (biases non-zero),
    the logits centred (a random conv stack's pooled ReLU features push every probability to
    one end, and parity on saturated probabilities would prove little)."""
    plan = make_plan(spec, privacy)
    return seeded_model(plan, MEANS, SCALES, seed=seed), plan


def encoded_rows(n: int, seed: int) -> np.ndarray:
    """Rows as agent.ingest.tables encodes them: raw numeric values (some NaN = missing),
    one-hot categoricals in declared level order (some all zero = missing)."""
    rng = np.random.default_rng(seed)
    columns = encoded_columns(FEATURES)
    x = np.zeros((n, len(columns)), dtype=np.float64)
    for i in numeric_column_indices(FEATURES):
        x[:, i] = MEANS[columns[i]] + 1.5 * SCALES[columns[i]] * rng.standard_normal(n)
    x[:, columns.index("admit_year")] = rng.integers(2016, 2024, n)
    x[rng.random((n, len(columns))) < 0.1] = np.nan
    pos = 0
    for f in FEATURES:
        if f.type == "categorical":
            pick = rng.integers(-1, len(f.levels), n)  # -1: missing, all zeros
            for j in range(len(f.levels)):
                x[:, pos + j] = (pick == j).astype(np.float64)
            pos += len(f.levels)
        else:
            pos += 1
    return x.astype(np.float32)


def raw_images(saved: SavedModel, n: int, seed: int) -> np.ndarray:
    """Windowed (0..1) images on the plan's grid, as preprocessing yields them, spread around
    the federation's average head as real series would be."""
    return grid_images(saved, n, seed)


def project_proba(saved: SavedModel, x: np.ndarray, images: np.ndarray | None) -> np.ndarray:
    """The project's own path (agent.demo.models.project_proba) on the reference kernels."""
    return demo_project_proba(saved, REF, x, images)


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def onnx_proba(sess: ort.InferenceSession, x: np.ndarray,
               images: np.ndarray | None) -> np.ndarray:
    feeds = {ox.INPUT_FEATURES: x, **({ox.INPUT_IMAGE: images} if images is not None else {})}
    return sess.run([ox.OUTPUT], feeds)[0]


@pytest.fixture(scope="module")
def exported():
    """name -> (SavedModel, Plan, exported ModelProto, session), built once per module."""
    out = {}
    for i, (name, spec) in enumerate(MODELS.items()):
        saved, plan = make_saved(spec, seed=i)
        model = ox.to_onnx(saved, clinical=ox.ENCODED, created=CREATED)
        out[name] = (saved, plan, model, session(model))
    return out


@pytest.fixture(scope="module")
def exported_raw():
    """name -> (SavedModel, session of the RAW-input export)."""
    out = {}
    for i, (name, spec) in enumerate(MODELS.items()):
        saved, _plan = make_saved(spec, seed=i)
        out[name] = (saved, session(ox.to_onnx(saved, created=CREATED)))
    return out


@pytest.mark.parametrize("name,n", [("logistic", 64), ("mlp", 64), ("cnn_k3", 3),
                                    ("cnn_k5", 3), ("cnn_k3", 64), ("cnn_k5", 64)])
def test_parity_with_project_forward(exported, name, n):
    saved, _plan, _model, sess = exported[name]
    x = encoded_rows(n, seed=n)
    images = raw_images(saved, n, seed=n + 1) if saved.layout.image_shape else None
    want = project_proba(saved, x, images)
    got = onnx_proba(sess, x, images)
    assert got.dtype == np.float32 and got.shape == want.shape == (n,)
    err = float(np.abs(got.astype(np.float64) - want).max())
    print(f"{name} N={n}: max |onnx - project| = {err:.3g}")
    assert err <= TOL
    assert np.ptp(want) > 0.1  # not a saturated model that would match anything


@pytest.mark.parametrize("name", ["cnn_k3", "cnn_k5"])
def test_parity_on_flat_images_with_ties(exported, name):
    """Images equal to the federation's mean standardise to zeros: every pooling window in the
    interior ties and only the zero padding shapes the borders."""
    saved, _plan, _model, sess = exported[name]
    mean = np.split(saved.image_norm, 2)[0].reshape(saved.layout.image_shape)
    images = np.stack([mean, mean + 0.5 * (np.indices(mean.shape).sum(0) % 2)]
                      ).astype(np.float32)
    x = encoded_rows(2, seed=9)
    np.testing.assert_allclose(onnx_proba(sess, x, images), project_proba(saved, x, images),
                               rtol=0, atol=TOL)


def test_graph_standardises_like_apply_standardization(exported):
    """The standardised features (an inner tensor made an output here) are bit for bit what
    apply_standardization gives, NaN -> 0 included, even for the year column."""
    saved, _plan, model, _sess = exported["mlp"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(
        "features_standardized", onnx.TensorProto.FLOAT, [ox.BATCH, len(saved.columns)]))
    x = encoded_rows(64, seed=5)
    assert np.isnan(x).any()
    got = session(probe).run(["features_standardized"], {ox.INPUT_FEATURES: x})[0]
    np.testing.assert_array_equal(got, apply_standardization(x, saved.mean, saved.scale))


def test_checker_opset_and_io(exported):
    for name, (saved, _plan, model, _sess) in exported.items():
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version == ox.IR_VERSION == 7
        assert [(o.domain, o.version) for o in model.opset_import] == [("", ox.OPSET)]
        assert ox.OPSET <= 13
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                  for i in model.graph.input}
        want = {ox.INPUT_FEATURES: [ox.BATCH, len(saved.columns)]}
        if name.startswith("cnn"):
            want[ox.INPUT_IMAGE] = [ox.BATCH, IMAGING.depth, IMAGING.size, IMAGING.size]
        assert inputs == want
        (out,) = model.graph.output
        assert out.name == ox.OUTPUT
        assert [d.dim_param for d in out.type.tensor_type.shape.dim] == [ox.BATCH]
        ops = {node.op_type for node in model.graph.node}
        assert ("Conv" in ops) == name.startswith("cnn")


def test_conv_nodes_follow_the_convention(exported):
    for name, k in (("cnn_k3", 3), ("cnn_k5", 5)):
        model = exported[name][2]
        attrs = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                 for n in model.graph.node}
        assert attrs["Conv"]["pads"] == [k // 2] * 4 == [ox.FORWARD.pad(k)] * 4
        assert attrs["Conv"]["strides"] == [1, 1]
        assert attrs["MaxPool"]["kernel_shape"] == attrs["MaxPool"]["strides"] == [2, 2]
    assert ox.FORWARD.padding == "same" and ox.FORWARD.pool == 2
    with pytest.raises(ValueError):
        ox.FORWARD.pad(4)


def test_model_card_round_trip(exported):
    for name, (saved, plan, model, _sess) in exported.items():
        card = ox.model_card(model)
        assert card == ox.build_model_card(saved, created=CREATED,
                                           extra={"clinical_inputs": "encoded"})
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in card.items())
        assert card["research_use_only"] == "true"
        assert card["federation"] == "stroke-eu" and card["rounds"] == "7"
        assert card["plan_sha256"] == plan_digest(plan)
        assert card["strategy"] == "fedavg"
        assert card["model_kind"] == saved.layout.kind
        assert card["layout_sha256"] == saved.layout.digest()
        assert card["created_utc"] == "2025-03-04T05:06:07+00:00"
        assert json.loads(card["columns"]) == list(saved.columns)
        features = json.loads(card["features"])
        assert [f["name"] for f in features] == [f.name for f in FEATURES]
        assert features[4] == {"name": "sex", "type": "categorical", "levels": ["F", "M"],
                               "unit": "", "columns": [4, 5]}
        assert features[0] == {"name": "age", "type": "numeric", "levels": [], "unit": "years",
                               "columns": [0]}
        assert "privacy" not in card  # a plan without [privacy]
        assert ("imaging" in card) == name.startswith("cnn")
    imaging = json.loads(ox.model_card(exported["cnn_k3"][2])["imaging"])
    assert imaging == {"modality": "CT", "depth": 8, "size": 32, "window_center": 40.0,
                       "window_width": 80.0}


def test_model_card_privacy_and_extra():
    privacy = PrivacySpec(min_cell=20, dp="client", dp_clip=0.5, dp_noise_multiplier=1.1)
    saved, plan = make_saved(MODELS["logistic"], privacy=privacy)
    model = ox.to_onnx(saved, created=CREATED, extra={"run": "r-42"})
    card = ox.model_card(model)
    assert json.loads(card["privacy"]) == privacy.to_dict()
    assert card["run"] == "r-42" and card["plan_sha256"] == plan_digest(plan)
    assert card["clinical_inputs"] == "raw"
    assert card == ox.build_model_card(saved, created=CREATED,
                                       extra={"run": "r-42", "clinical_inputs": "raw"})
    with pytest.raises(ValueError, match="extra"):
        ox.build_model_card(saved, created=CREATED, extra={"federation": "other"})


def test_written_and_reloaded_from_disk(exported, tmp_path):
    saved, _plan, model, sess = exported["cnn_k3"]
    path = ox.save_onnx(saved, tmp_path / "sub" / "model.onnx", clinical=ox.ENCODED,
                        created=CREATED)
    again = ox.load_onnx(path)
    assert ox.model_card(again) == ox.model_card(model)
    assert again.SerializeToString() == model.SerializeToString()
    x, images = encoded_rows(3, seed=11), raw_images(saved, 3, seed=12)
    from_disk = onnx_proba(session(str(path)), x, images)
    np.testing.assert_array_equal(from_disk, onnx_proba(sess, x, images))
    np.testing.assert_allclose(from_disk, project_proba(saved, x, images), rtol=0, atol=TOL)


def test_export_of_a_model_read_back_by_modelfile(exported, tmp_path):
    """model.json + model.f32 as the coordinator writes them export to the same graph."""
    saved, _plan, model, _sess = exported["cnn_k5"]
    save_model(tmp_path / "model", saved)
    again = ox.to_onnx(load_model(tmp_path / "model"), clinical=ox.ENCODED, created=CREATED)
    assert again.SerializeToString() == model.SerializeToString()


def test_damaged_file_is_refused(exported, tmp_path):
    path = ox.save_onnx(exported["logistic"][0], tmp_path / "m.onnx", created=CREATED)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError or the checker's error
        ox.load_onnx(path)


def _replace(saved: SavedModel, **changes) -> SavedModel:
    return SavedModel(**{**saved.__dict__, **changes})


def test_inconsistent_models_are_refused():
    saved, _ = make_saved(MODELS["mlp"])
    cnn, _ = make_saved(MODELS["cnn_k3"])
    bad = {
        "columns": _replace(saved, columns=saved.columns[:-1]),
        "params": _replace(saved, params=saved.params.astype(np.float64)),
        "scale": _replace(saved, scale=np.zeros_like(saved.scale)),
        "image_norm": _replace(cnn, image_norm=None),
        "image_norm on mlp": _replace(saved, image_norm=cnn.image_norm),
        "names": _replace(saved, columns=tuple(reversed(saved.columns))),
    }
    for what, model in bad.items():
        with pytest.raises(ValueError):
            ox.to_onnx(model, created=CREATED)
            pytest.fail(f"{what} accepted")
    with pytest.raises(ValueError, match="timezone"):
        ox.to_onnx(saved, created=datetime(2025, 1, 1))


# ------------------------------------------------------------------ raw clinical inputs

NUMERIC_CELLS = ("", "NA", " n/a ", ".", "null")  # missing, as the table reader reads them
LEVEL_CELLS = {"sex": ("F", "M", "f", " m ", "", "NA", "None"),
               "occlusion": ("ICA", "M1", "m2", "ica", " M2", "", "nan")}


def raw_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Rows as a hospital CSV holds them: numbers as text with padding and missing tokens,
    levels in mixed case, padded, or missing."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = {}
        for f in FEATURES:
            if f.type == "categorical":
                row[f.name] = str(rng.choice(LEVEL_CELLS[f.name]))
            elif rng.random() < 0.1:
                row[f.name] = str(rng.choice(NUMERIC_CELLS))
            elif f.name == "admit_year":
                row[f.name] = str(int(rng.integers(2016, 2024)))
            else:
                value = MEANS[f.name] + 1.5 * SCALES[f.name] * rng.standard_normal()
                row[f.name] = f" {value:.3f}"
        row["mrs_good"] = str(int(rng.integers(0, 2)))
        rows.append(row)
    return rows


def read_as_training_does(tmp_path, rows, missing="mean"):
    """The same rows through agent.ingest.tables.load_table (a real CSV file)."""
    import csv

    from agent.ingest.tables import load_table

    path = tmp_path / f"rows-{len(rows)}-{missing}.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return load_table(path, FEATURES, "mrs_good", missing)


@pytest.mark.parametrize("name,n", [("logistic", 64), ("mlp", 64), ("cnn_k3", 5),
                                    ("cnn_k5", 5)])
def test_raw_inputs_encode_like_the_table_reader(exported_raw, tmp_path, name, n):
    """CSV text in, the table reader's encoding and the project's forward pass out."""
    saved, sess = exported_raw[name]
    rows = raw_rows(n, seed=40 + n)
    table = read_as_training_does(tmp_path, rows)
    assert table.n_rows == n  # every cell here is readable (missing is not a skip reason)
    images = raw_images(saved, n, seed=7) if saved.layout.image_shape else None
    feeds = ox.row_feeds(FEATURES, rows)
    if images is not None:
        feeds[ox.INPUT_IMAGE] = images
    got = sess.run([ox.OUTPUT], feeds)[0]
    want = project_proba(saved, table.x, images)
    err = float(np.abs(got.astype(np.float64) - want).max())
    print(f"{name} raw N={n}: max |onnx - project| = {err:.3g}")
    assert err <= TOL and np.ptp(want) > 0.05


def test_raw_encoding_is_bit_for_bit_the_readers(exported_raw, tmp_path):
    saved, _sess = exported_raw["mlp"]
    probe = ox.to_onnx(saved, created=CREATED)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(
        "features_encoded", onnx.TensorProto.FLOAT, [ox.BATCH, len(saved.columns)]))
    rows = raw_rows(200, seed=3)
    got = session(probe).run(["features_encoded"], ox.row_feeds(FEATURES, rows))[0]
    want = read_as_training_does(tmp_path, rows).x.astype(np.float32)
    np.testing.assert_array_equal(got, want)  # NaN where missing, in the same cells


def test_unknown_level_gives_nan_where_training_skips_the_row(exported_raw, tmp_path):
    saved, sess = exported_raw["logistic"]
    rows = raw_rows(6, seed=5)
    rows[2]["occlusion"] = "basilar"  # not a declared level
    got = sess.run([ox.OUTPUT], ox.row_feeds(FEATURES, rows))[0]
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()
    table = read_as_training_does(tmp_path, rows)
    assert table.skipped == {"unknown_level:occlusion": 1}
    np.testing.assert_allclose(np.delete(got, 2), project_proba(saved, table.x, None), atol=TOL)


def test_policy_drop_leaves_missing_rows_unscored(tmp_path):
    spec = MODELS["mlp"]
    saved, _ = make_saved(spec)
    plan = Plan(**{**make_plan(spec).__dict__, "missing": "drop"})
    saved = _replace(saved, plan=plan_to_toml_dict(plan))
    rows = raw_rows(40, seed=8)
    got = session(ox.to_onnx(saved, created=CREATED)).run(
        [ox.OUTPUT], ox.row_feeds(FEATURES, rows))[0]
    table = read_as_training_does(tmp_path, rows, missing="drop")
    kept = table.row_numbers - 1
    assert 0 < len(kept) < 40
    assert np.isnan(np.delete(got, kept)).all()
    np.testing.assert_allclose(got[kept], project_proba(saved, table.x, None), atol=TOL)


def test_raw_graph_interface(exported_raw):
    saved, _ = exported_raw["cnn_k3"]
    model = ox.to_onnx(saved, created=CREATED)
    assert sorted((o.domain, o.version) for o in model.opset_import) == [
        ("", ox.OPSET), (ox.ML_DOMAIN, ox.ML_OPSET)]
    kinds = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert list(kinds) == [f.name for f in FEATURES] + [ox.INPUT_IMAGE]
    assert kinds["sex"] == onnx.TensorProto.STRING
    assert kinds["age"] == kinds[ox.INPUT_IMAGE] == onnx.TensorProto.FLOAT


def test_row_feeds_name_what_is_wrong():
    rows = raw_rows(2, seed=1)
    del rows[1]["nihss"]
    with pytest.raises(ValueError, match="row 2: no value for feature 'nihss'"):
        ox.row_feeds(FEATURES, rows)
    rows = raw_rows(2, seed=1)
    rows[0]["age"] = "seventy"
    with pytest.raises(ValueError, match="row 1: feature 'age': unparseable"):
        ox.row_feeds(FEATURES, rows)

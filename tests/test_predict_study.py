"""`fedsilo model export` then `fedsilo predict --clinical ROW --study PATH`: one patient's
generated CT study and clinical row scored by onnxruntime on the exported file, against the
project's own ingest pipeline and forward pass."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import kernels.reference as REF
from agent.demo import ct
from agent.demo.imaging import DEMO_IMAGING
from agent.demo.models import demo_model
from agent.ingest.pipeline import IngestPipeline
from agent.learn.modelfile import SavedModel, save_model
from agent.learn.models import predict_proba
from agent.learn.onnx_runtime import rows_from_encoded
from agent.learn.standardize import apply_standardization

ROW = {"age": "74", "sex": "Female", "nihss": "14", "onset_to_door_min": "", "glucose_mmol_l":
       "7.9", "systolic_bp": "162", "atrial_fibrillation": "yes", "prestroke_mrs": "1",
       "thrombolysis": "NO", "thrombectomy": "yes"}


def fedsilo(*args) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def inline(row: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in row.items())


def saved_model(kind: str, seed: int = 0) -> SavedModel:
    """A seeded fused CNN (or logistic) model of the demo's plan, biases non-zero."""
    return demo_model(kind, seed=seed)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One synthetic patient's NCCT series (real DICOM files) and its grid as the site's
    pipeline makes it."""
    d = tmp_path_factory.mktemp("study")
    scanner = ct.scanner_for_site(0)
    hu = ct.head_phantom_hu(scanner, 25.0, np.random.default_rng(4))
    ct.write_series(d / "study", "SYN-00042", hu, scanner)
    pipeline = IngestPipeline(d / "state", DEMO_IMAGING, kernel_backend="reference")
    try:
        pipeline.ingest_tree(d / "study")
        pipeline.complete_series(quiet_s=0.0)
        (path,) = pipeline.store.series_for_patients(DEMO_IMAGING).values()
        image = np.load(path, allow_pickle=False)
    finally:
        pipeline.close()
    return d / "study", image


def project_probability(saved: SavedModel, row: dict[str, str], image) -> float:
    """The project's own path: the table reader's encoding, apply_standardization, the site's
    image standardisation, models.predict_proba."""
    import csv
    import tempfile
    from pathlib import Path

    from agent.config import plan_from_dict
    from agent.ingest.tables import load_table

    plan = plan_from_dict(saved.plan)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "row.csv"
        with table.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            w.writeheader()
            w.writerow(row)
        t = load_table(table, plan.features, None, plan.missing)
    assert t.n_rows == 1
    # the inverse encoding the site uses gives the same cells back
    assert rows_from_encoded(plan.features, t.x)[0]["sex"] == "female"
    x = apply_standardization(t.x, saved.mean, saved.scale)
    images = None
    if image is not None:
        mean, scale = np.split(saved.image_norm, 2)
        images = ((image - mean.reshape(image.shape)) / scale.reshape(image.shape))[None]
        images = images.astype(np.float32)
    return float(predict_proba(saved.layout, saved.params, x, REF, images)[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> model directory with model.json + model.onnx (written by the CLI)."""
    out = {}
    for kind in ("cnn_fused", "logistic"):
        d = tmp_path_factory.mktemp(kind)
        saved = saved_model(kind)
        save_model(d, saved)
        r = fedsilo("model", "export", "--model", d)
        assert r.returncode == 0, r.stderr
        assert f"wrote {d / 'model.onnx'}" in r.stdout and "research use only" in r.stdout
        out[kind] = (d, saved)
    return out


def test_study_and_row_scored_like_the_project(exported, study):
    model_dir, saved = exported["cnn_fused"]
    folder, image = study
    r = fedsilo("predict", "--model", model_dir, "--clinical", inline(ROW), "--study", folder,
                "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    want = project_probability(saved, ROW, image)
    assert abs(doc["probability"] - want) <= 1e-5
    assert 0.02 < want < 0.98
    assert doc["research_use_only"] is True and doc["model_kind"] == "cnn_fused"
    # the human-readable form, and a one-row CSV file instead of the inline row
    csv_row = folder.parent / "row.csv"
    csv_row.write_text(",".join(ROW) + "\n" + ",".join(ROW.values()) + "\n")
    r = fedsilo("predict", "--model", model_dir / "model.onnx", "--clinical", csv_row,
                "--study", folder)
    assert r.returncode == 0, r.stderr
    assert f"P({saved.plan['target']['column']} = 1) = {want:.4f}" in r.stdout
    assert "research use only" in r.stdout and "8x32x32 grid" in r.stdout


def test_table_model_scores_a_row_without_a_study(exported):
    model_dir, saved = exported["logistic"]
    r = fedsilo("predict", "--model", model_dir, "--clinical", inline(ROW), "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["probability"]
               - project_probability(saved, ROW, None)) <= 1e-5


def test_bad_rows_and_arguments_are_named(exported, study, capsys, monkeypatch):
    cnn, _ = exported["cnn_fused"]
    table_model, _ = exported["logistic"]
    folder, _ = study
    garbage = folder.parent / "garbage.onnx"
    garbage.write_bytes((table_model / "model.onnx").read_bytes()[:-100])  # truncated
    encoded = folder.parent / "encoded.onnx"
    r = fedsilo("model", "export", "--model", table_model, "--out", encoded, "--encoded-inputs")
    assert r.returncode == 0 and "encoded clinical inputs" in r.stdout, r.stderr
    cases = [
        ((cnn, inline(ROW)), 2, "also reads the patient's CT series", "--study"),
        ((table_model, inline(ROW), "--study", folder), 2, "reads no image", "--study"),
        ((table_model, inline({k: v for k, v in ROW.items() if k != "nihss"})), 2,
         "no value for nihss", "--clinical"),
        ((table_model, inline({**ROW, "nihs": "3"})), 2, "no feature named nihs", "--clinical"),
        ((table_model, inline({**ROW, "age": "old"})), 2, "'age': unparseable", "--clinical"),
        ((table_model, inline({**ROW, "sex": "unknown-x"})), 1, "sex='unknown-x' is not one of",
         "cannot score"),
        ((cnn.parent, inline(ROW)), 2, "no model.onnx", "--model"),
        ((garbage, inline(ROW)), 2, "not a valid ONNX model", "--model"),
        ((encoded, inline(ROW)), 2, "scoring needs 'raw'", "--model"),
    ]
    # The CLI's own entry point in this process (one subprocess per case would cost ~1 s
    # each; test_study_and_row_scored_like_the_project runs the real command). Its logging
    # setup would take over this process's root logger, so it is left out here.
    from agent.cli import main

    monkeypatch.setattr("agent.ops.logsetup.setup_logging", lambda *a, **k: None)

    for args, code, *needles in cases:
        model, clinical, *rest = args
        assert main(["predict", "--model", str(model), "--clinical", clinical,
                     *map(str, rest)]) == code, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        for needle in needles:
            assert needle in err, (needle, err)

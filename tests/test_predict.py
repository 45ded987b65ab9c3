"""`fedsilo predict`: a model trained by a real federation (Mosquitto, `fedsilo site run`
processes, the coordinator) scores a table from the command line exactly as the library does."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels
from agent.config import ModelSpec, Plan, TrainingSpec
from agent.federation.broker import LocalMosquitto, find_mosquitto
from agent.ingest.tables import load_table
from agent.learn import metrics
from agent.learn.layout import build_layout
from agent.learn.modelfile import SavedModel, load_model, save_model
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization
from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_site,
    stop_all,
    write_site_config,
)

pytestmark = pytest.mark.integration

FED = "predict-test"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, held-out test table, features): a 2-site mlp federation, 3 rounds."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    d = tmp_path_factory.mktemp("fed")
    tables, test, features = breast_cancer_sites(d / "data")
    plan = Plan(federation=FED, sites=("north", "south"), rounds=3, min_sites=2,
                round_deadline_s=30.0, target="label", features=features,
                model=ModelSpec("mlp", hidden=(8,)),
                training=TrainingSpec(local_epochs=1, batch_size=16, learning_rate=0.05,
                                      optimizer="sgd", momentum=0.9))
    with LocalMosquitto() as broker:
        procs = [start_site(write_site_config(d / "sites", name, FED, broker.port, table),
                            d / f"{name}.log")
                 for name, table in zip(plan.sites, tables[:2], strict=True)]
        CoordinatorThread(plan, broker.port, d / "coord").start().join(timeout=180)
        assert stop_all(procs) == [0, 0]
    return d / "coord" / "model", test, features


def predict(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def with_broken_rows(test: Path, out: Path, *, label: bool = True, mrn: bool = True) -> Path:
    """The held-out table with an id column and three rows the reader must skip."""
    rows = list(csv.reader(test.open()))
    header, body = rows[0], rows[1:]
    body[3][0] = "not-a-number"            # unparseable:f00
    body[5][-1] = ""                       # target_missing (only when labelled)
    body[7] = body[7][:-2]                 # wrong_field_count
    if not label:
        header, body = header[:-1], [r[:-1] for r in body]
    if mrn:
        header = ["mrn", *header]
        body = [[f"P{i:04d}", *r] for i, r in enumerate(body)]
    with out.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *body])
    return out


def library_scores(model_dir: Path, table: Path, features, target: str | None,
                   id_column: str | None):
    model = load_model(model_dir)
    t = load_table(table, features, target, "mean", id_column)
    p = predict_proba(model.layout, model.params,
                      apply_standardization(t.x, model.mean, model.scale),
                      kernels.get_backend("auto"))
    return t, p


def read_out(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    rows = list(csv.reader(path.open()))
    return rows[0], [r[0] for r in rows[1:]], np.array([float(r[1]) for r in rows[1:]],
                                                          dtype=np.float32)


def test_probabilities_and_auc_are_the_librarys(trained, tmp_path):
    model_dir, test, features = trained
    table = with_broken_rows(test, tmp_path / "scoring.csv")
    run = predict("--model", model_dir, "--table", table, "--out", tmp_path / "p.csv",
                  "--id-column", "mrn")
    assert run.returncode == 0, run.stderr
    t, p = library_scores(model_dir, table, features, "label", "mrn")
    header, keys, probs = read_out(tmp_path / "p.csv")
    assert header == ["mrn", "probability"]
    assert keys == list(t.ids) and "P0003" not in keys and "P0005" not in keys
    np.testing.assert_array_equal(probs, p)  # to the bit: 9 digits give back a float32
    auc = metrics.roc_auc(t.y, p)
    assert 0.8 < auc <= 1.0
    out = run.stdout.splitlines()
    assert out[0] == (f"scored {len(keys)} of {t.rows_read} rows; skipped: target_missing 1, "
                      "unparseable:f00 1, wrong_field_count 1")
    assert out[1] == f"AUC {auc:.4f} over {len(keys)} rows"


def test_an_unlabelled_table_is_scored_by_row_number_to_stdout(trained, tmp_path):
    model_dir, test, features = trained
    table = with_broken_rows(test, tmp_path / "new.csv", label=False, mrn=False)
    run = predict("--model", model_dir, "--table", table)
    assert run.returncode == 0, run.stderr
    (tmp_path / "stdout.csv").write_text(run.stdout)
    header, keys, probs = read_out(tmp_path / "stdout.csv")
    t, p = library_scores(model_dir, table, features, None, None)
    assert header == ["row", "probability"]
    assert keys == [str(n) for n in t.row_numbers] and "4" not in keys and "8" not in keys
    assert "6" in keys  # its label was blanked, but there is no label column now
    np.testing.assert_array_equal(probs, p)
    assert run.stderr.splitlines() == [
        f"scored {len(keys)} of {t.rows_read} rows; skipped: unparseable:f00 1, "
        "wrong_field_count 1", "no label column in the table: AUC not computed"]


def refused(run: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # one line, no traceback
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_broken_inputs_exit_2_with_one_line(trained, tmp_path):
    model_dir, test, _features = trained
    refused(predict("--model", tmp_path / "nowhere", "--table", test), "--model",
            f"{tmp_path / 'nowhere'}: no such directory")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for name in ("model.f32",):
        (garbage / name).write_bytes((model_dir / name).read_bytes())
    (garbage / "model.json").write_text("{not json")
    refused(predict("--model", garbage, "--table", test), "--model", "cannot read model")
    missing = tmp_path / "missing.csv"
    rows = [r[1:] for r in csv.reader(test.open())]  # without f00
    with missing.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    refused(predict("--model", model_dir, "--table", missing), "--table",
            "required column 'f00' is missing from the header")
    refused(predict("--model", model_dir, "--table", tmp_path / "absent.csv"), "--table",
            "file not found")
    refused(predict("--model", model_dir, "--table", test, "--id-column", "mrn"),
            "required column 'mrn' is missing")


def test_an_imaging_model_is_refused_as_not_supported_yet(trained, tmp_path):
    model_dir, _test, _features = trained
    real = load_model(model_dir)
    spec = ModelSpec("cnn_fused", hidden=(4,), conv_channels=(2,))
    layout = build_layout(spec, len(real.columns), image_shape=(2, 16, 16))
    plan = json.loads((model_dir / "model.json").read_text())["plan"]
    save_model(tmp_path / "cnn", SavedModel(layout=layout, params=np.zeros(layout.size,
                                                                           np.float32),
                                            columns=real.columns, mean=real.mean,
                                            scale=real.scale, plan=plan,
                                            image_norm=np.ones(2 * 2 * 16 * 16, np.float32)))
    refused(predict("--model", tmp_path / "cnn", "--table", _test), "--model",
            "cnn_fused model also needs each patient's images",
            "not supported by this command yet")


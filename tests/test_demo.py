"""`fedsilo demo` end to end, as a newcomer runs it: its printed AUCs and summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "packaging" / "examples"


def test_demo_federated_model_beats_site_alone_and_nears_pooled(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "agent", "demo", "--sites", "3", "--rounds",
                          "15", "--seed", "0", "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"federated_auc", "pooled_auc", "site_alone_auc", "rounds",
                            "seconds", "round_overhead_s"}
    assert summary["rounds"] == 15 and len(summary["site_alone_auc"]) == 3
    alone_mean = sum(summary["site_alone_auc"].values()) / 3
    assert abs(summary["federated_auc"] - summary["pooled_auc"]) <= 0.02
    assert summary["federated_auc"] > alone_mean
    assert 0.6 < summary["pooled_auc"] < 0.95  # a believable clinical model, not a toy
    # Progress per round and the three AUCs are on screen.
    assert run.stdout.count(" round ") >= 15
    for label in ("federated", "pooled data", "site alone"):
        assert label in run.stdout
    assert (out / "coordinator" / "model" / "model.json").exists()


def test_demo_help_lists_its_knobs():
    run = subprocess.run([sys.executable, "-m", "agent", "demo", "--help"], capture_output=True,
                         text=True, timeout=60)
    for knob in ("--sites", "--rounds", "--seed", "--out"):
        assert knob in run.stdout


@pytest.mark.parametrize("name", ["site.toml", "coordinator.toml", "plan.toml"])
def test_shipped_example_configs_are_valid(name):
    run = subprocess.run([sys.executable, "-m", "agent", "config", "check", str(EXAMPLES / name)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_imaging_demo_ingests_every_study_and_ct_adds_to_the_tables(tmp_path):
    out = tmp_path / "imaging"
    run = subprocess.run([sys.executable, "-m", "agent", "demo", "--imaging", "--sites", "3",
                          "--rounds", "15", "--seed", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary-imaging.json").read_text())
    for site, ingest in summary["ingest"].items():
        assert ingest["stored"] > 0 and not ingest["quarantined"], site
        assert not ingest["series_invalid"], site
    # One site's scanner sends RLE-compressed images: they were decoded and stored too.
    assert summary["heldout_patients"] > 300
    assert summary["auc_tables_and_ct"] > summary["auc_tables_only"]
    assert "tables + head CT" in run.stdout
    # After the federation: a new patient's CT, sent by storescu to one site's listener, was
    # scored there with the model the coordinator distributed, and its SR reached storescp.
    new = summary["new_study"]
    assert new is not None, run.stdout[-2000:]
    assert 0.0 < new["probability"] < 1.0 and new["sr_sent"] == "sent" and new["dsrdump_ok"]
    assert "result SR sent to PACS@127.0.0.1" in run.stdout

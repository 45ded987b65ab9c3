"""What the final AUC line claims: over how many patients and sites it really is."""

from __future__ import annotations

import csv

import pytest

from agent.federation.coordinator import describe_final_auc, weighted_metrics
from tests.fedharness import (
    breast_cancer_sites,
    start_coordinator,
    stop_all,
    write_coordinator_files,
)
from tests.test_federation import launch, plan_for


def _report(n, auc, loss=0.5, reason=None):
    ev = {"n": n, "loss": loss, "auc": auc, "accuracy": 0.8}
    if reason:
        ev["reason"] = reason
    return {"eval": ev}


def test_auc_counts_only_the_sites_and_patients_that_have_one():
    reports = {"north": _report(29, 0.8), "south": _report(29, None, reason="one_outcome_class"),
               "east": _report(0, None, loss=None, reason="too_few_patients")}
    ev = weighted_metrics(reports)
    assert ev["n"] == 58 and ev["auc_n"] == 29 and ev["auc_sites"] == ["north"]
    assert ev["loss_n"] == 58 and ev["loss_sites"] == ["north", "south"]
    assert ev["without_auc"] == {"south": "one_outcome_class", "east": "too_few_patients"}
    line = describe_final_auc(ev)
    assert line.startswith("held-out AUC 0.800 over 29 patients at 1 site (no AUC from ")
    assert "south: its held-out patients all have one outcome" in line
    assert "east: fewer held-out patients than the minimum for metrics" in line


def test_auc_weighted_by_the_patients_behind_each_site_auc():
    ev = weighted_metrics({"a": _report(10, 0.6), "b": _report(30, 0.8)})
    assert ev["auc"] == pytest.approx(0.75) and ev["auc_n"] == 40
    assert describe_final_auc(ev) == "held-out AUC 0.750 over 40 patients at 2 sites"
    assert describe_final_auc({}) == "no held-out AUC (no site could compute one)"


@pytest.mark.integration
def test_coordinator_final_line_names_the_site_without_auc(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    rows = list(csv.reader(tables[1].open()))
    one_class = [rows[0], *(r for r in rows[1:] if r[-1] == "1")]
    with tables[1].open("w", newline="") as fh:
        csv.writer(fh).writerows(one_class)  # south: every patient had the same outcome
    names = ["north", "south"]
    plan = plan_for(features, names, rounds=2)
    sites = launch(tmp_path, mosquitto.port, names, tables[:2])
    cfg, plan_file, _state = write_coordinator_files(tmp_path / "coord", plan, mosquitto.port)
    log = tmp_path / "coord.log"
    assert start_coordinator(cfg, plan_file, log).wait(120) == 0
    assert stop_all(sites) == [0, 0]
    line = next(x for x in log.read_text().splitlines() if "finished: held-out AUC" in x)
    assert " at 1 site (no AUC from south: its held-out patients all have one outcome)" in line
    north_holdout = round(0.2 * (len(list(csv.reader(tables[0].open()))) - 1))
    assert f"over {north_holdout} patients at 1 site" in line

"""`fedsilo demo`: a whole federation on one machine, compared with the two honest baselines.

Embedded Mosquitto, the coordinator in this process, each hospital as its own `fedsilo site
run` process with its own generated cohort. Afterwards the federated model, each site's
model trained alone, and one model trained on the pooled data are scored on one common test
set that none of them trained on.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tomli_w import dumps as dumps_toml

from agent.config import (
    BrokerConfig,
    CoordinatorConfig,
    ModelSpec,
    Plan,
    TrainingSpec,
    plan_to_toml_dict,
)
from agent.demo import cohort
from agent.demo.baselines import score_alone_and_pooled
from agent.federation.broker import LocalMosquitto
from agent.federation.coordinator import Coordinator
from agent.learn import metrics
from agent.learn.modelfile import load_model
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization

import kernels as kernel_registry


def demo_plan(site_names: list[str], rounds: int, seed: int) -> Plan:
    return Plan(
        federation="stroke-demo",
        sites=tuple(site_names),
        rounds=rounds,
        min_sites=max(1, len(site_names) - 1),
        round_deadline_s=60.0,
        target=cohort.DEMO_TARGET,
        features=cohort.demo_features(),
        missing="mean",
        model=ModelSpec(kind="logistic"),
        training=TrainingSpec(local_epochs=1, batch_size=32, learning_rate=0.05,
                              optimizer="sgd", momentum=0.9, weight_decay=1e-4),
        seed=seed,
    )


def _write_site(out: Path, name: str, broker_port: int, fed: str) -> Path:
    site_dir = out / "sites" / name
    doc = {
        "site": {"id": name, "federation": fed, "state_dir": "state"},
        "broker": {"host": "127.0.0.1", "port": broker_port},
        "data": {"table": "clinical.csv", "holdout_fraction": 0.2, "split_seed": 0},
    }
    (site_dir / "site.toml").write_text(dumps_toml(doc))
    return site_dir / "site.toml"


def _print_round(record: dict[str, Any], rounds: int) -> None:
    ev = record.get("eval_before", {})
    auc = ev.get("auc")
    print(f"  round {record['round']:>3}/{rounds}  sites {len(record['sites'])}  "
          f"train loss {record['train_loss']:.4f}  held-out AUC (model in) "
          f"{auc if auc is None else f'{auc:.3f}'}  {record['seconds']:.2f} s "
          f"(overhead {record['overhead_s'] * 1000:.0f} ms)", flush=True)


def run_demo(*, sites: int, rounds: int, seed: int, out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    out = out.resolve()
    (out / "sites").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    profiles = cohort.default_profiles(sites, seed)
    names = [p.name for p in profiles]
    print(f"fedsilo demo: {sites} hospitals, {rounds} rounds, seed {seed}, output {out}")
    for p in profiles:
        (out / "sites" / p.name).mkdir(parents=True, exist_ok=True)
        cohort.write_table_csv(cohort.generate_cohort(p, rng), out / "sites" / p.name /
                               "clinical.csv", profile=p, rng=rng)
        print(f"  generated {p.name}: {p.n_patients} patients")
    test_path = out / "common_test.parquet"
    _write_parquet(cohort.common_test_set(profiles, rng), test_path)

    plan = demo_plan(names, rounds, seed)
    (out / "plan.toml").write_text(dumps_toml(plan_to_toml_dict(plan)))
    with LocalMosquitto(out / "broker") as broker:
        print(f"  embedded Mosquitto on 127.0.0.1:{broker.port}")
        (out / "coordinator.toml").write_text(dumps_toml({
            "coordinator": {"state_dir": "coordinator"},
            "broker": {"host": "127.0.0.1", "port": broker.port}}))
        procs = []
        for name in names:
            cfg = _write_site(out, name, broker.port, plan.federation)
            log = open(cfg.parent / "site.log", "wb")  # noqa: SIM115 - closed below
            procs.append((name, log, subprocess.Popen(
                [sys.executable, "-m", "agent", "site", "run", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})))
        config = CoordinatorConfig(state_dir=out / "coordinator",
                                   broker=BrokerConfig(port=broker.port))
        coordinator = Coordinator(config, plan, on_round=lambda r: _print_round(r, rounds))
        try:
            final = coordinator.run()
        finally:
            for name, log, proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait(timeout=10)
                log.close()
                if proc.returncode != 0:
                    print(f"  warning: site {name} exited with {proc.returncode}; see its log")

    summary = _score(out, plan, profiles, test_path, coordinator, final)
    summary["seconds"] = time.monotonic() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, out)
    return summary


def _write_parquet(columns: dict[str, np.ndarray], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), path)


def _score(out: Path, plan: Plan, profiles, test_path: Path, coordinator: Coordinator,
           final: dict[str, Any]) -> dict[str, Any]:
    from agent.ingest.tables import load_table

    k = kernel_registry.get_backend("auto")
    test = load_table(test_path, plan.features, plan.target, plan.missing)
    model = load_model(out / "coordinator" / "model")
    p = predict_proba(model.layout, model.params,
                      apply_standardization(test.x, model.mean, model.scale), k)
    federated_auc = metrics.roc_auc(test.y, p)
    alone, pooled = score_alone_and_pooled(
        plan, [out / "sites" / pr.name / "clinical.csv" for pr in profiles], test, k)
    history = [h for h in coordinator.history if "round" in h and "final" not in h]
    return {
        "federated_auc": float(federated_auc),
        "pooled_auc": float(pooled),
        "site_alone_auc": {pr.name: float(a) for pr, a in zip(profiles, alone, strict=True)},
        "site_alone_mean_auc": float(np.mean(alone)),
        "federated_heldout_auc": final.get("eval", {}).get("auc"),
        "rounds": plan.rounds,
        "sites": [pr.name for pr in profiles],
        "test_patients": int(test.y.size),
        "round_overhead_s": statistics.median(h["overhead_s"] for h in history),
        "round_seconds_median": statistics.median(h["seconds"] for h in history),
        "model": str(out / "coordinator" / "model" / "model.json"),
        "metrics": str(out / "coordinator" / "metrics.json"),
    }


def _print_summary(s: dict[str, Any], out: Path) -> None:
    print("\nAUC on a common test set of", s["test_patients"], "patients none of them trained on:")
    print(f"  federated ({len(s['sites'])} hospitals)   {s['federated_auc']:.3f}")
    print(f"  pooled data (the ceiling)    {s['pooled_auc']:.3f}")
    for name, auc in s["site_alone_auc"].items():
        print(f"  {name:<28} {auc:.3f}  (site alone)")
    print(f"  mean of site-alone models    {s['site_alone_mean_auc']:.3f}")
    print(f"\nround overhead (median): {s['round_overhead_s'] * 1000:.1f} ms; "
          f"total {s['seconds']:.1f} s; summary in {out / 'summary.json'}")

"""`fedsilo demo --imaging`: the same hospitals with their head CTs, tables alone vs tables + CT.

Each hospital gets a cohort whose outcome also depends on the infarct core (visible on CT,
absent from the registry), writes one synthetic NCCT series per patient as DICOM in its own
scanner's style, ingests it (decode, de-identify, assemble, preprocess, store), and then two
federations run on identical rows: a model on the clinical table alone and the fused
CNN + table model. Both are scored by every site on its held-out patients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tomli_w import dumps as dumps_toml

from agent.config import ImagingSpec, ModelSpec, Plan, TrainingSpec
from agent.demo import cohort, ct
from agent.demo.run import (
    DemoFiles,
    coordinator_for,
    demo_plan,
    identity_table,
    make_demo_pki,
    start_sites,
    wait_sites,
)
from agent.demo.scoring import score_new_study
from agent.federation.broker import LocalMosquitto
from agent.ingest.pipeline import IngestPipeline

DEMO_IMAGING = ImagingSpec(modality="CT", depth=8, size=32, window_center=40.0,
                           window_width=80.0)


def imaging_plans(names: list[str], rounds: int, seed: int) -> tuple[Plan, Plan]:
    """Tables only, and tables + CT; same features, optimizer budget and seed."""
    tables = dataclasses.replace(demo_plan(names, rounds, seed), federation="stroke-tables")
    fused = dataclasses.replace(
        tables, federation="stroke-imaging",
        model=ModelSpec(kind="cnn_fused", hidden=(), conv_channels=(4, 8), kernel_size=3),
        training=TrainingSpec(local_epochs=2, batch_size=32, learning_rate=0.01,
                              optimizer="adam", weight_decay=1e-4),
        imaging=DEMO_IMAGING)
    return tables, fused


def _prepare_site(out: Path, index: int, profile: cohort.SiteProfile,
                  rng: np.random.Generator) -> Path:
    site_dir = out / "sites" / profile.name
    shutil.rmtree(site_dir, ignore_errors=True)
    site_dir.mkdir(parents=True)
    columns = cohort.generate_cohort(profile, rng, imaging=True, include_latent=True)
    table = {k: v for k, v in columns.items() if not k.startswith("_")}
    cohort.write_table_csv(table, site_dir / "clinical.csv", profile=profile, rng=rng)
    scanner = ct.scanner_for_site(index)
    print(f"  {profile.name}: {profile.n_patients} patients, CT by {scanner.model} "
          f"({scanner.slice_mm} mm slices, noise {scanner.noise_hu} HU"
          f"{', RLE-compressed' if scanner.compressed else ''})", flush=True)
    ct.write_site_studies(site_dir / "dicom", table["patient_id"], columns["_core_ml"],
                          scanner, rng, progress=True)
    return site_dir


def _ingest(site_dir: Path) -> dict[str, Any]:
    pipeline = IngestPipeline(site_dir / "state", DEMO_IMAGING)
    try:
        pipeline.ingest_tree(site_dir / "dicom", progress=True)
        pipeline.complete_series(quiet_s=0.0)
        return pipeline.summary()
    finally:
        pipeline.close()


def _write_site_configs(out: Path, names: list[str], port: int, plan: Plan) -> None:
    for name in names:
        site_dir = out / "sites" / name
        (site_dir / f"site-{plan.federation}.toml").write_text(dumps_toml({
            "site": {"id": name, "federation": plan.federation, "state_dir": "state"},
            "broker": {"host": "127.0.0.1", "port": port},
            "data": {"table": "clinical.csv", "id_column": "patient_id",
                     "holdout_fraction": 0.2, "split_seed": 0},
            "identity": identity_table(out, name),
        }))


def _federate(files: DemoFiles, port: int, label: str) -> dict[str, Any]:
    names = [p.name for p in files.profiles]
    _write_site_configs(files.out, names, port, files.plan)
    t0 = time.monotonic()
    procs = start_sites(files, port, config_name=f"site-{files.plan.federation}.toml")

    def progress(record: dict[str, Any]) -> None:
        auc = record.get("eval_before", {}).get("auc")
        print(f"  [{label}] round {record['round']:>2}/{files.plan.rounds}  train loss "
              f"{record['train_loss']:.4f}  held-out AUC (model in) "
              f"{'n/a' if auc is None else f'{auc:.3f}'}  {record['seconds']:.1f} s", flush=True)

    coordinator = coordinator_for(files, port, on_round=progress,
                                  state_name=f"coordinator-{files.plan.federation}")
    try:
        final = coordinator.run()
    finally:
        wait_sites(procs, timeout_s=60)
    return {"auc": final.get("eval", {}).get("auc"), "n": final.get("eval", {}).get("n"),
            "seconds": time.monotonic() - t0, "per_site": final.get("per_site")}


def run_imaging_demo(*, sites: int, rounds: int, seed: int, out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    out = out.resolve()
    logging.getLogger("agent").setLevel(logging.WARNING)
    print(f"fedsilo imaging demo: {sites} hospitals with head CTs, {rounds} rounds, seed {seed}, "
          f"output {out}")
    rng = np.random.default_rng(seed)
    profiles = cohort.default_profiles(sites, seed)
    print("generating cohorts and writing each patient's NCCT series as DICOM...")
    site_dirs = [_prepare_site(out, i, p, rng) for i, p in enumerate(profiles)]
    print("ingesting at each site (decode, de-identify, assemble, preprocess, store)...")
    ingest = {}
    for p, site_dir in zip(profiles, site_dirs, strict=True):
        ingest[p.name] = _ingest(site_dir)
        print(f"  {p.name}: {json.dumps(ingest[p.name])}", flush=True)

    tables_plan, fused_plan = imaging_plans([p.name for p in profiles], rounds, seed)
    make_demo_pki(out, [p.name for p in profiles])  # one CA for both federations
    results = {}
    with LocalMosquitto(out / "broker") as broker:
        for label, plan in (("tables", tables_plan), ("tables+CT", fused_plan)):
            files = DemoFiles(out=out, plan=plan, profiles=profiles, test_path=Path())
            print(f"federation '{plan.federation}' ({label}):", flush=True)
            results[label] = _federate(files, broker.port, label)
        print(f"after the federation: a new patient's head CT at {profiles[0].name}, scored "
              f"by the distributed model at the site:", flush=True)
        new_study = score_new_study(out, site_dirs[0], 0, profiles[0], fused_plan.federation,
                                    broker.port, rng)
    summary = {
        "auc_tables_only": results["tables"]["auc"],
        "auc_tables_and_ct": results["tables+CT"]["auc"],
        "heldout_patients": results["tables+CT"]["n"],
        "ingest": ingest,
        "rounds": rounds,
        "seconds": time.monotonic() - t0,
        "federations": results,
        "new_study": new_study,
    }
    (out / "summary-imaging.json").write_text(json.dumps(summary, indent=1))
    print("\nheld-out AUC over all sites' held-out patients (sample-weighted):")
    print(f"  tables only           {summary['auc_tables_only']:.3f}")
    print(f"  tables + head CT      {summary['auc_tables_and_ct']:.3f}")
    print(f"total {summary['seconds']:.0f} s; summary in {out / 'summary-imaging.json'}")
    return summary

"""`fedsilo demo`: a whole federation on one machine, compared with the two honest baselines.

Embedded Mosquitto, the coordinator in this process, each hospital as its own `fedsilo site
run` process with its own generated cohort. Afterwards the federated model, each site's
model trained alone, and one model trained on the pooled data are scored on one common test
set that none of them trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tomli_w import dumps as dumps_toml

import kernels as kernel_registry
from agent.config import (
    BrokerConfig,
    CompressionSpec,
    CoordinatorConfig,
    IdentityFiles,
    ModelSpec,
    Plan,
    PrivacySpec,
    StrategySpec,
    TrainingSpec,
    plan_to_toml_dict,
)
from agent.demo import cohort
from agent.demo.attack import ENV as ATTACK_ENV
from agent.demo.baselines import score_alone_and_pooled
from agent.federation.broker import LocalMosquitto
from agent.federation.coordinator import Coordinator
from agent.ingest.tables import load_table
from agent.learn import metrics
from agent.learn.modelfile import load_model
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization
from agent.ops.report import write_report
from agent.privacy.accountant import noise_multiplier_for_budget
from agent.security.pki import PKI

# `fedsilo demo` trains a small MLP and sends int8 codes of the top 5 % of each update (with
# error feedback): 20x fewer bytes than float32 at the same AUC (benchmarks/bench_compression).
# The imaging demo and the federation benchmark keep `demo_plan`'s logistic model.
DEMO_MODEL = ModelSpec(kind="mlp", hidden=(32,))
DEMO_COMPRESSION = CompressionSpec(quantize="int8", topk_fraction=0.05)
DEMO_PRIVATE_COMPRESSION = CompressionSpec(quantize="int8")  # masks and noise cover every value
DEMO_DP_CLIP = 0.5  # L2 bound of one hospital's round update (typical norms: 0.1-0.6)


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


def make_demo_pki(out: Path, sites: list[str], federation: str | None = None) -> None:
    """A fresh CA in out/pki and an identity for every hospital and the coordinator: the
    demo's MQTT is plaintext on loopback, but every manifest is signed and checked as in
    production."""
    shutil.rmtree(out / "pki", ignore_errors=True)
    pki = PKI.init(out / "pki", federation)
    for name in sites:
        pki.issue("site", name)
    pki.issue("coordinator", "coordinator")


def identity_table(out: Path, name: str) -> dict[str, str]:
    """The [identity] of `name` in the demo's PKI: its messages are signed, its peers' checked."""
    pki = out / "pki"
    return {"ca": str(pki / "ca.crt"), "cert": str(pki / f"{name}.crt"),
            "key": str(pki / f"{name}.key"), "crl": str(pki / "crl.pem")}


def write_site_config(out: Path, name: str, broker_port: int, fed: str,
                      signed: bool = True) -> Path:
    """The demo hospital's site.toml: loopback broker, its cohort, its identity if `signed`."""
    site_dir = out / "sites" / name
    doc: dict[str, Any] = {
        "site": {"id": name, "federation": fed, "state_dir": "state"},
        "broker": {"host": "127.0.0.1", "port": broker_port},
        "data": {"table": "clinical.csv", "holdout_fraction": 0.2, "split_seed": 0},
    }
    if signed:
        doc["identity"] = identity_table(out, name)
    (site_dir / "site.toml").write_text(dumps_toml(doc))
    return site_dir / "site.toml"


def _print_round(record: dict[str, Any], rounds: int) -> None:
    ev = record.get("eval_before", {})
    auc = ev.get("auc")
    discounted = record.get("discounted") or {}
    print(f"  round {record['round']:>3}/{rounds}  sites {len(record['sites'])}  "
          f"train loss {record['train_loss']:.4f}  held-out AUC (model in) "
          f"{auc if auc is None else f'{auc:.3f}'}  {record['seconds']:.2f} s "
          f"(overhead {record['overhead_s'] * 1000:.0f} ms)"
          + (f"  discounted: {', '.join(f'{k} ({v})' for k, v in discounted.items())}"
             if discounted else ""), flush=True)


@dataclass(frozen=True)
class DemoFiles:
    """Everything a demo (or benchmark) federation needs on disk, except the broker port."""

    out: Path
    plan: Plan
    profiles: list[cohort.SiteProfile]
    test_path: Path


def prepare_demo(out: Path, *, sites: int, rounds: int, seed: int,
                 verbose: bool = True, max_patients: int | None = None,
                 **plan_changes: Any) -> DemoFiles:
    """Generate each hospital's cohort and the common test set; write the plan.

    `max_patients` caps every cohort (the scale benchmark's hundreds of sites share 2 cores)."""
    out = out.resolve()
    # A demo always starts a fresh federation (coordinator_for clears the coordinator's state).
    shutil.rmtree(out / "broker", ignore_errors=True)
    rng = np.random.default_rng(seed)
    profiles = cohort.default_profiles(sites, seed)
    if max_patients is not None:
        profiles = [dataclasses.replace(p, n_patients=min(p.n_patients, max_patients))
                    for p in profiles]
    for p in profiles:
        site_dir = out / "sites" / p.name
        shutil.rmtree(site_dir, ignore_errors=True)
        site_dir.mkdir(parents=True)
        cohort.write_table_csv(cohort.generate_cohort(p, rng), site_dir / "clinical.csv",
                               profile=p, rng=rng)
        if verbose:
            print(f"  generated {p.name}: {p.n_patients} patients")
    test_path = out / "common_test.parquet"
    _write_parquet(cohort.common_test_set(profiles, rng), test_path)
    plan = dataclasses.replace(demo_plan([p.name for p in profiles], rounds, seed),
                               **plan_changes)
    (out / "plan.toml").write_text(dumps_toml(plan_to_toml_dict(plan)))
    make_demo_pki(out, [p.name for p in profiles], plan.federation)
    return DemoFiles(out=out, plan=plan, profiles=profiles, test_path=test_path)


def start_sites(files: DemoFiles, port: int, names: list[str] | None = None, *,
                config_name: str | None = None, signed: bool = True,
                attacker: tuple[str, str] | None = None
                ) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """Each hospital as its own `fedsilo site run` process, logging to its own file.

    With `config_name`, each site's existing config of that name is used as written;
    `signed=False` leaves out the identity (benchmarks measure what signing costs);
    `attacker` = (site, attack) makes that site misbehave (agent/demo/attack.py)."""
    procs = []
    for name in names or [p.name for p in files.profiles]:
        if config_name is None:
            cfg = write_site_config(files.out, name, port, files.plan.federation, signed)
        else:
            cfg = files.out / "sites" / name / config_name
        with open(cfg.with_suffix(".log"), "wb") as log:
            procs.append((name, subprocess.Popen(
                [sys.executable, "-m", "agent", "site", "run", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1",
                     **({ATTACK_ENV: attacker[1]} if attacker and attacker[0] == name
                        else {})})))
    return procs


def wait_sites(procs: list[tuple[str, subprocess.Popen[bytes]]], timeout_s: float = 20) -> None:
    for name, proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
        if proc.returncode != 0:
            print(f"  warning: site {name} exited with {proc.returncode}; see its site.log")


def coordinator_for(files: DemoFiles, port: int, *, state_name: str = "coordinator",
                    signed: bool = True, **kwargs: Any) -> Coordinator:
    shutil.rmtree(files.out / state_name, ignore_errors=True)  # a demo starts afresh
    identity = identity_table(files.out, "coordinator") if signed else None
    doc: dict[str, Any] = {"coordinator": {"state_dir": state_name},
                           "broker": {"host": "127.0.0.1", "port": port}}
    if identity is not None:
        doc["identity"] = identity
    (files.out / f"{state_name}.toml").write_text(dumps_toml(doc))
    config = CoordinatorConfig(
        state_dir=files.out / state_name, broker=BrokerConfig(port=port),
        identity=IdentityFiles(**{k: Path(v) for k, v in identity.items()}) if identity
        else None)
    return Coordinator(config, files.plan, **kwargs)


def demo_privacy(secure: bool, dp_epsilon: float | None, rounds: int) -> PrivacySpec:
    """`--secure` and `--dp-epsilon X`: the noise is the least that lets every round fit X."""
    if dp_epsilon is None:
        return PrivacySpec(secure_aggregation=secure)
    delta = PrivacySpec().dp_delta
    sigma = noise_multiplier_for_budget(dp_epsilon, delta, rounds)
    return PrivacySpec(secure_aggregation=secure, dp="client", dp_clip=DEMO_DP_CLIP,
                       dp_noise_multiplier=sigma, dp_epsilon=dp_epsilon, dp_delta=delta)


def run_demo(*, sites: int, rounds: int, seed: int, out: Path,
             strategy: StrategySpec | None = None, attack: str | None = None,
             privacy: PrivacySpec | None = None) -> dict[str, Any]:
    """The whole demo federation; `attack` makes the last hospital misbehave, to show what
    the plan's `strategy` does about it; `privacy` turns on secure aggregation and DP (the
    updates are then int8 without top-k: masks and DP noise cover every value)."""
    t0 = time.monotonic()
    strategy = strategy or StrategySpec()
    privacy = privacy or PrivacySpec()
    private = privacy.secure_aggregation or privacy.dp != "none"
    print(f"fedsilo demo: {sites} hospitals, {rounds} rounds, seed {seed}, output {out}, "
          f"strategy {strategy.name}"
          + (", secure aggregation" if privacy.secure_aggregation else "")
          + (f", client-level DP (epsilon budget {privacy.dp_epsilon:g}, delta "
             f"{privacy.dp_delta:g}, noise multiplier {privacy.dp_noise_multiplier:.3f}, "
             f"clip {privacy.dp_clip:g})" if privacy.dp != "none" else ""))
    logging.getLogger("agent").setLevel(logging.WARNING)  # the round lines are the progress
    files = prepare_demo(out, sites=sites, rounds=rounds, seed=seed, model=DEMO_MODEL,
                         compression=DEMO_PRIVATE_COMPRESSION if private
                         else DEMO_COMPRESSION, strategy=strategy, privacy=privacy)
    attacker = (files.profiles[-1].name, attack) if attack else None
    if attacker:
        print(f"  {attacker[0]} will send {attack} updates (a misbehaving hospital)")
    with LocalMosquitto(files.out / "broker") as broker:
        print(f"  embedded Mosquitto on 127.0.0.1:{broker.port} (plaintext, loopback only); "
              f"starting {sites} site processes and the coordinator, each signing its "
              f"messages with its identity from {files.out / 'pki'}")
        procs = start_sites(files, broker.port, attacker=attacker)
        coordinator = coordinator_for(files, broker.port,
                                      on_round=lambda r: _print_round(r, rounds))
        try:
            final = coordinator.run()
        finally:
            wait_sites(procs)
    print("  scoring the federated model and both baselines on the common test set...")
    logging.getLogger("agent.ingest").setLevel(logging.ERROR)  # the sites already said it
    summary = _score(files, coordinator, final)
    summary["seconds"] = time.monotonic() - t0
    summary["strategy"] = strategy.name
    summary["attack"] = {"site": attacker[0], "kind": attacker[1]} if attacker else None
    summary["discounted"] = {h["round"]: h.get("discounted", {}) for h in coordinator.history
                             if "round" in h and h.get("discounted")}
    summary["privacy"] = {**privacy.to_dict(), "rounds_trained": sum(
        1 for h in coordinator.history if "round" in h and "final" not in h),
        "epsilon_spent": coordinator.history_epsilon()}
    (files.out / "summary.json").write_text(json.dumps(summary, indent=1))
    report = write_report(files.out / "coordinator" / "metrics.json", files.out / "report.html")
    _print_summary(summary, files.out)
    print(f"report (open it in a browser): {report}")
    return summary


def _write_parquet(columns: dict[str, np.ndarray], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), path)


def _score(files: DemoFiles, coordinator: Coordinator, final: dict[str, Any]) -> dict[str, Any]:
    out, plan, profiles = files.out, files.plan, files.profiles

    k = kernel_registry.get_backend("auto")
    test = load_table(files.test_path, plan.features, plan.target, plan.missing)
    model = load_model(out / "coordinator" / "model")
    p = predict_proba(model.layout, model.params,
                      apply_standardization(test.x, model.mean, model.scale), k)
    federated_auc = metrics.roc_auc(test.y, p)
    alone, pooled = score_alone_and_pooled(
        plan, [out / "sites" / pr.name / "clinical.csv" for pr in profiles], test, k)
    history = [h for h in coordinator.history if "round" in h and "final" not in h]
    ups: dict[str, list[int]] = {}
    for h in history:
        for site, r in h["per_site"].items():
            ups.setdefault(site, []).append(int(r["bytes_up"]))
    raw = model.layout.size * 4
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
        # bytes one site uploads in a round (median over rounds), and against float32
        "bytes_up_per_round": {site: statistics.median(v) for site, v in sorted(ups.items())},
        "compression": plan.to_dict()["compression"] | {
            "raw_bytes": raw,
            "ratio": raw / statistics.median(b for v in ups.values() for b in v)},
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
    if s.get("attack"):
        flagged = sorted({site for d in s["discounted"].values() for site in d})
        print(f"\nstrategy {s['strategy']} with {s['attack']['site']} sending "
              f"{s['attack']['kind']} updates: federated AUC {s['federated_auc']:.3f}; "
              f"discounted in {len(s['discounted'])} of {s['rounds']} rounds: "
              f"{', '.join(flagged) or 'none'}")
    pv = s.get("privacy") or {}
    if pv.get("secure_aggregation"):
        print("\nsecure aggregation: the coordinator saw only the masked sum of each round's "
              "updates")
    if pv.get("dp", "none") != "none":
        print(f"differential privacy ({pv['dp']} level): epsilon spent "
              f"{pv['epsilon_spent']:.3f} of {pv['dp_epsilon']:g} (delta {pv['dp_delta']:g}) in "
              f"{pv['rounds_trained']} rounds; federated AUC {s['federated_auc']:.3f}")
    c = s["compression"]
    print(f"\nupdates: {c['quantize']}, top-k fraction {c['topk_fraction']:g}, zstd "
          f"{c['zstd_level']}: {c['ratio']:.1f}x fewer bytes than float32 ({c['raw_bytes']})")
    print(f"round overhead (median): {s['round_overhead_s'] * 1000:.1f} ms; "
          f"total {s['seconds']:.1f} s; summary in {out / 'summary.json'}")

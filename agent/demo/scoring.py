"""The demo's last step: a new patient's CT reaches one hospital after the federation, and the
federation's model scores it there, as it would in production.

Radiology (dcmtk's storescu) sends the study to the site's DICOM listener; the site agent
(`fedsilo site run`, with `[results] score = true`) verifies the model the coordinator
distributed, scores the completed series with the patient's clinical row, keeps the result
and sends a DICOM SR to the PACS (dcmtk's storescp). Everything is synthetic.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tomli_w import dumps as dumps_toml

from agent.demo import cohort, ct
from agent.demo.run import identity_table
from agent.federation.broker import free_port, wait_listening

CALLER = "DEMO_CT"
TOOLS = ("storescu", "storescp", "dsrdump")


def _new_patient(site_dir: Path, profile: cohort.SiteProfile, rng: np.random.Generator
                 ) -> tuple[str, float]:
    """One new admission: its row appended to the site's clinical table (outcome not known
    yet), its latent infarct core for the CT."""
    columns = cohort.generate_cohort(profile, rng, 1, imaging=True, include_latent=True)
    pid = f"SYN-{profile.name}-NEW-0001"
    with (site_dir / "clinical.csv").open("a", newline="") as fh:
        row = [pid if c == "patient_id" else "" if c == cohort.DEMO_TARGET
               else cohort.cell_text(c, columns[c][0], profile) for c in cohort.TABLE_COLUMNS]
        csv.writer(fh).writerow(row)
    return pid, float(columns["_core_ml"][0])


def score_new_study(out: Path, site_dir: Path, index: int, profile: cohort.SiteProfile,
                    federation: str, broker_port: int, rng: np.random.Generator
                    ) -> dict[str, Any] | None:
    """Run the step; None (with a line saying why) when a part it needs is missing."""
    import shutil

    state = site_dir / "state"
    if not (state / "model" / "model.onnx").is_file():
        print(f"  {profile.name} holds no distributed model.onnx: scoring step skipped")
        return None
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"  dcmtk's {', '.join(missing)} not found (apt install dcmtk): scoring step "
              f"skipped")
        return None
    pid, core_ml = _new_patient(site_dir, profile, rng)
    scanner = ct.scanner_for_site(index)
    study = out / "new-study"
    shutil.rmtree(study, ignore_errors=True)
    files = ct.write_series(study, pid, ct.head_phantom_hu(scanner, core_ml, rng), scanner)
    pacs_dir = out / "pacs"
    shutil.rmtree(pacs_dir, ignore_errors=True)
    pacs_dir.mkdir(parents=True)
    pacs_port, listen_port = free_port(), free_port()
    cfg = site_dir / "site-scoring.toml"
    cfg.write_text(dumps_toml({
        "site": {"id": profile.name, "federation": federation, "state_dir": "state"},
        "broker": {"host": "127.0.0.1", "port": broker_port},
        "data": {"table": "clinical.csv", "id_column": "patient_id"},
        "identity": identity_table(out, profile.name),
        "dicom": {"listen": True, "bind": "127.0.0.1", "port": listen_port,
                  "allowed_callers": [CALLER], "series_quiet_s": 1.0},
        "results": {"score": True, "retry_s": 5.0,
                    "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                             "timeout_s": 10.0}},
    }))
    log_path = cfg.with_suffix(".log")
    pacs = subprocess.Popen(["storescp", "-od", str(pacs_dir), "-aet", "PACS", str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    site = None
    try:
        wait_listening(pacs_port, pacs, "storescp", 10)
        with log_path.open("wb") as log:
            site = subprocess.Popen([sys.executable, "-m", "agent", "site", "run", "--config",
                                     str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_listening(listen_port, site, f"{profile.name}'s DICOM listener", 60)
        sent = subprocess.run(["storescu", "-aet", CALLER, "-aec", "FEDSILO", "127.0.0.1",
                               str(listen_port), *map(str, files)], capture_output=True,
                              text=True, timeout=60)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr.strip()[-300:]}")
        print(f"  radiology (storescu) sent {len(files)} CT images of a new patient to "
              f"{profile.name}'s DICOM listener", flush=True)
        deadline = time.monotonic() + 120
        while not any(pacs_dir.iterdir()):
            if time.monotonic() > deadline or site.poll() is not None:
                raise RuntimeError(f"no SR reached the PACS; see {log_path}")
            time.sleep(0.25)
        time.sleep(0.5)  # the agent records the send right after the PACS answers
    finally:
        if site is not None and site.poll() is None:
            site.terminate()
            site.wait(timeout=30)
        pacs.kill()
        pacs.wait(timeout=10)
    return _report(state, pacs_dir, pacs_port)


def _report(state: Path, pacs_dir: Path, pacs_port: int) -> dict[str, Any]:
    from agent.learn.onnx_runtime import load_exported
    from agent.results.scoring import ScoreBook

    model = load_exported(state / "model" / "model.onnx")
    book = ScoreBook(state)
    try:
        (score,) = [s for s in book.all() if s.model_sha256 == model.sha256]
    finally:
        book.close()
    (sr,) = sorted(pacs_dir.iterdir())
    dump = subprocess.run(["dsrdump", str(sr)], capture_output=True, text=True, timeout=30)
    print(f"  {state.parent.name} scored it with model.onnx {model.version} "
          f"(verified, {model.card['model_kind']}): P({model.target} = 1) = "
          f"{score.probability:.3f}")
    print(f"  result SR sent to PACS@127.0.0.1:{pacs_port} (dcmtk storescp), stored as {sr}; "
          f"dsrdump {'reads it' if dump.returncode == 0 else 'FAILED on it'}")
    return {"probability": score.probability, "model_version": model.version,
            "sr_file": str(sr), "sr_sent": score.sr_status, "dsrdump_ok": dump.returncode == 0}

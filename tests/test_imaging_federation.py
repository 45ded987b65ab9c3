"""An imaging federation end to end: DICOM in through `fedsilo ingest` at one site and the
site agent's watch folder at the other, a cnn_fused model trained over a real Mosquitto, and
no patient identifier from the DICOM headers on the wire."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from tomli_w import dumps

from agent.config import ImagingSpec, ModelSpec, TrainingSpec, plan_to_toml_dict
from agent.demo import cohort, ct
from agent.demo.run import demo_plan
from agent.federation import topics
from agent.learn.modelfile import load_model
from tests.fedharness import CoordinatorThread, start_site, stop_all
from tests.test_lifecycle import read_retained

pytestmark = pytest.mark.integration

FED = "img-test"
SCANNER = dataclasses.replace(ct.SCANNERS[0], slice_mm=10.0)  # 4 slices: quick
PHI_NAME = "ZZQUIRKOVSKY^ELVIRA"
PHI_BIRTH = "19230405"


def write_site(root: Path, name: str, n: int, seed: int) -> tuple[Path, Path, list[str]]:
    """A site's clinical table and one CT series per patient, headers full of PHI."""
    rng = np.random.default_rng(seed)
    profile = dataclasses.replace(cohort.default_profiles(1, seed)[0], name=name, n_patients=n,
                                  broken_row_rate=0.0, missing_rate=0.0)
    columns = cohort.generate_cohort(profile, rng, imaging=True, include_latent=True)
    ids = [f"MRN{seed}{i:05d}X" for i in range(n)]  # distinctive hospital record numbers
    table = {k: v for k, v in columns.items() if not k.startswith("_")}
    table["patient_id"] = np.array(ids)
    site_dir = root / name
    site_dir.mkdir(parents=True)
    cohort.write_table_csv(table, site_dir / "clinical.csv", profile=profile, rng=rng)
    dicom = root / f"{name}-dicom"
    for i, (pid, core) in enumerate(zip(ids, columns["_core_ml"], strict=True)):
        for path in ct.write_series(dicom / f"{i:03d}", pid,
                                    ct.head_phantom_hu(SCANNER, float(core), rng), SCANNER):
            ds = pydicom.dcmread(path)
            ds.PatientName = PHI_NAME
            ds.PatientBirthDate = PHI_BIRTH
            ref = Dataset()
            ref.PatientName = PHI_NAME
            ref.PatientID = pid
            ds.ReferencedPatientSequence = Sequence([ref])
            ds.save_as(path)
    return site_dir, dicom, ids


def site_config(site_dir: Path, name: str, port: int, watch: Path | None) -> Path:
    doc = {"site": {"id": name, "federation": FED, "state_dir": str(site_dir / "state")},
           "broker": {"host": "127.0.0.1", "port": port},
           "data": {"table": str(site_dir / "clinical.csv"), "id_column": "patient_id",
                    "holdout_fraction": 0.25}}
    if watch is not None:
        doc["dicom"] = {"watch_dir": str(watch), "series_quiet_s": 1.0}
    path = site_dir / "site.toml"
    path.write_text(dumps(doc))
    return path


def test_fused_model_trains_on_ingested_images_and_no_phi_leaves(tmp_path, mosquitto):
    n = 40
    a_dir, a_dicom, a_ids = write_site(tmp_path, "alpha", n, 1)
    b_dir, b_dicom, b_ids = write_site(tmp_path, "beta", n, 2)
    imaging = ImagingSpec(depth=4, size=16)
    plan = dataclasses.replace(
        demo_plan(["alpha", "beta"], rounds=2, seed=0), federation=FED, round_deadline_s=60.0,
        model=ModelSpec("cnn_fused", hidden=(), conv_channels=(2,), kernel_size=3),
        training=TrainingSpec(local_epochs=1, batch_size=16, learning_rate=0.01,
                              optimizer="adam"),
        imaging=imaging)
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(dumps(plan_to_toml_dict(plan)))

    # Site alpha: one-shot `fedsilo ingest` into its state directory before it starts.
    run = subprocess.run([sys.executable, "-m", "agent", "ingest", str(a_dicom), "--state",
                          str(a_dir / "state"), "--plan", str(plan_file), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["stored"] == n * SCANNER.n_slices and not summary["quarantined"]

    # Site beta: its agent picks the files up from a watch folder.
    wire: list[bytes] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = lambda _c, _u, msg: wire.append(bytes(msg.payload))
    spy.connect("127.0.0.1", mosquitto.port)
    spy.subscribe("fedsilo/#", qos=1)
    spy.loop_start()
    procs = [start_site(site_config(a_dir, "alpha", mosquitto.port, None), tmp_path / "a.log"),
             start_site(site_config(b_dir, "beta", mosquitto.port, b_dicom),
                        tmp_path / "b.log")]
    # Series wait for the plan's grid before they are preprocessed; the files are in the store.
    read_retained(mosquitto.port, topics.site_status(FED, "beta"),
                  lambda d: d.get("ingest_stored", 0) >= n * SCANNER.n_slices, timeout=90)
    assert not any(b_dicom.rglob("*.dcm"))  # the watch folder moved every file in

    rounds: list[dict] = []
    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=rounds.append).start().join(timeout=180)
    assert stop_all(procs) == [0, 0]
    spy.loop_stop()
    spy.disconnect()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites"] == ["alpha", "beta"] for r in rounds)
    # Every patient had an image, so every usable row trained (holdout 25%).
    assert rounds[0]["samples"] == 2 * (n - round(n * 0.25))
    assert final["eval"]["n"] == 2 * round(n * 0.25)

    # The saved model carries the federation's per-voxel image standardisation.
    model = load_model(tmp_path / "coord" / "model")
    assert model.image_norm is not None and model.image_norm.size == 2 * 4 * 16 * 16
    assert np.all(model.image_norm[4 * 16 * 16:] > 0)

    status = read_retained(mosquitto.port, topics.site_status(FED, "beta"))
    assert status["ingest_stored"] == n * SCANNER.n_slices and status["rows_without_image"] == 0
    assert status["series_complete"] == n

    # No identifier from the DICOM headers or the table ids is on the wire.
    blob = b"\n".join(wire)
    assert len(wire) > 10
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            for p in (a_dicom).rglob("*.dcm")}
    for secret in [PHI_NAME, PHI_BIRTH, "QUIRKOVSKY", *a_ids, *b_ids, *uids]:
        assert secret.encode() not in blob, f"{secret} reached MQTT"

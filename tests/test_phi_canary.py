"""PHI canary run: identifiers planted everywhere a hospital's data carries them, and none of
them in any byte that leaves a site or that the agents write to a log.

Three hospitals and a coordinator, each its own process, train an imaging model over a real
Mosquitto. DICOM reaches the sites three ways: `fedsilo ingest` of a PACS export (alpha), the
watch folder (beta) and the C-STORE listener fed by dcmtk's storescu (gamma). Every identifying
attribute the generator writes (and a few more a real modality writes) holds its own canary,
UIDs use a canary root, the clinical table's id column and a free-text column the plan does not
use hold canaries, and so do the exported file and folder names. Captured: every MQTT message
(topic, payload, properties, retained ones included, the will of a site killed with SIGKILL),
the broker's log at every level (client ids, topics), every process's stdout and stderr, the
retained status documents and `fedsilo status`, and the coordinator's state directory (model,
metrics). No canary may appear in any of it, in any case, in UTF-8 or UTF-16. So the test
cannot pass on an empty capture, it also checks that the capture holds the run (updates of
every site, round lines, the will) and that the inputs really held the canaries.

Paths below the watch folder reach a log only when something goes wrong: here a file the
exporter still holds open for writing past 30 s (the watch folder warns about it; before issue
13.5 the warning named the patient's folder and file) and a file that is not DICOM
(quarantined). Not forced: a traceback from the running agents (nothing reachable without a
hack raises past the watch folder's or the ingest pipeline's handlers, and root ignores
unreadable folders); tracebacks with watch-folder paths are covered in tests/test_logsetup.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from tomli_w import dumps

from agent.config import ImagingSpec, ModelSpec, TrainingSpec
from agent.demo import cohort, ct
from agent.demo.run import demo_plan
from agent.federation import topics
from agent.federation.broker import MOSQUITTO_HINT, LocalMosquitto, find_mosquitto, free_port
from tests.fedharness import start_coordinator, start_site, stop_all, write_coordinator_files
from tests.test_lifecycle import read_retained

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk (storescu) not found")]

FED = "stroke-net"
SITES = ("alpha", "beta", "gamma")
N_PATIENTS = 20
SCANNER = dataclasses.replace(ct.SCANNERS[0], slice_mm=10.0)  # 4 slices: quick
UID_ROOT = "1.2.826.0.1.3680043.99999"
PATIENT_FOLDER = "CANARYFOLDER5519_DOE^JOHN"
FILE_PREFIX = "CANARYFILE6120"
BIRTH_DATE = "19370823"  # plausible, and nothing else in a run looks like it
STUDY_DATE = "20170311"
# One canary per attribute, so a leak says which attribute leaked.
ATTRIBUTES = {
    "PatientName": "CANARYPN7731^JANE",
    "PatientBirthDate": BIRTH_DATE,
    "PatientAddress": "CANARYADDR7070 MAIN STREET",
    "OtherPatientIDs": "CANARYOPID4410",
    "AccessionNumber": "CANARYAN6621",
    "InstitutionName": "CANARYINST5150 HOSPITAL",
    "ReferringPhysicianName": "CANARYRP4417^DOCTOR",
    "OperatorsName": "CANARYOPN9981^TECH",
    "StationName": "CANARYSTN1207",
    "DeviceSerialNumber": "CANARYDSN6044",
    "StudyDescription": "CANARYSTD2290 HEAD",
    "SeriesDescription": "CANARYSED3381 NCCT",
    "StudyID": "CANARYSI5512",
    "StudyDate": STUDY_DATE,
    "SeriesDate": STUDY_DATE,
}
NOTE = "CANARYNOTE3307 lives at 12 Elm Road, daughter Ann"  # free text, not in the plan
# What no captured byte may hold: every canary carries CANARY; the rest carry none.
FORBIDDEN = ("canary", BIRTH_DATE, STUDY_DATE, "3680043.99999", "doe^john", "elm road")


def patient_id(site: int, i: int) -> str:
    return f"CANARYID8842-{site}{i:03d}"


# ------------------------------------------------------------------------------ inputs


def write_inputs(root: Path, site: int, name: str) -> tuple[Path, Path, list[Path]]:
    """(site dir with clinical.csv, DICOM export folder, its files) for one hospital."""
    rng = np.random.default_rng(site + 1)
    profile = dataclasses.replace(cohort.default_profiles(1, site)[0], name=name,
                                  n_patients=N_PATIENTS, broken_row_rate=0.0, missing_rate=0.0)
    columns = cohort.generate_cohort(profile, rng, imaging=True, include_latent=True)
    ids = [patient_id(site, i) for i in range(N_PATIENTS)]
    table = {k: v for k, v in columns.items() if not k.startswith("_")}
    table["patient_id"] = np.array(ids)
    site_dir = root / name
    site_dir.mkdir(parents=True)
    clinical = site_dir / "clinical.csv"
    cohort.write_table_csv(table, clinical, profile=profile, rng=rng)
    with open(clinical, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows[0].append("notes")
    for row in rows[1:]:
        row.append(f"{NOTE}; {row[0]}")
    with open(clinical, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)

    export = root / f"{name}-export"
    scratch = root / f"{name}-scratch"
    files: list[Path] = []
    for i, (pid, core) in enumerate(zip(ids, columns["_core_ml"], strict=True)):
        generated = ct.write_series(scratch / f"{i:03d}", pid,
                                    ct.head_phantom_hu(SCANNER, float(core), rng), SCANNER)
        folder = export / f"{PATIENT_FOLDER}_{site}{i:03d}" / "CT HEAD"
        folder.mkdir(parents=True)
        for k, path in enumerate(generated):
            ds = pydicom.dcmread(path)
            for keyword, value in ATTRIBUTES.items():
                setattr(ds, keyword, value)
            ref = Dataset()
            ref.PatientName = ATTRIBUTES["PatientName"]
            ref.PatientID = pid
            ds.ReferencedPatientSequence = Sequence([ref])
            ds.StudyInstanceUID = f"{UID_ROOT}.{site}.{i}.1"
            ds.SeriesInstanceUID = f"{UID_ROOT}.{site}.{i}.1.2"
            ds.FrameOfReferenceUID = f"{UID_ROOT}.{site}.{i}.1.3"
            ds.SOPInstanceUID = f"{UID_ROOT}.{site}.{i}.1.2.{k + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            target = folder / f"{FILE_PREFIX}_{pid}_{k + 1:03d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            files.append(target)
    shutil.rmtree(scratch)
    return site_dir, export, files


def assert_inputs_hold_the_canaries(site_dir: Path, files: list[Path]) -> None:
    """Read back what the hospitals hand over: the canaries are really there."""
    assert len(files) == N_PATIENTS * SCANNER.n_slices
    for path in files:
        assert FILE_PREFIX in path.name and PATIENT_FOLDER in str(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword, value in ATTRIBUTES.items():
            assert str(ds.data_element(keyword).value) == value, keyword
        assert str(ds.PatientID).startswith("CANARYID8842-")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert str(ds.data_element(keyword).value).startswith(UID_ROOT + "."), keyword
        assert str(ds.ReferencedPatientSequence[0].PatientName) == ATTRIBUTES["PatientName"]
    with open(site_dir / "clinical.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_PATIENTS
    assert all(r["patient_id"].startswith("CANARYID8842-") and r["notes"].startswith(NOTE)
               for r in rows)


def site_config(site_dir: Path, name: str, port: int, dicom: dict[str, Any] | None) -> Path:
    doc: dict[str, Any] = {
        "site": {"id": name, "federation": FED, "state_dir": str(site_dir / "state")},
        "broker": {"host": "127.0.0.1", "port": port},
        "data": {"table": str(site_dir / "clinical.csv"), "id_column": "patient_id",
                 "holdout_fraction": 0.25}}
    if dicom is not None:
        doc["dicom"] = {"series_quiet_s": 1.0, **dicom}
    path = site_dir / "site.toml"
    path.write_text(dumps(doc))
    return path


# ------------------------------------------------------------------------------ capture


class WireSpy:
    """An MQTT 5 client on '#' keeping every message: topic, payload, retain flag and every
    property (user properties, content type, response topic, correlation data, ...)."""

    def __init__(self, port: int, client_id: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("#", qos=1)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        record = {"topic": msg.topic, "payload": bytes(msg.payload), "retain": bool(msg.retain),
                  "qos": msg.qos,
                  "properties": {} if props is None else
                  {k: (v.hex() if isinstance(v, bytes) else v) for k, v in props.json().items()},
                  "correlation": getattr(props, "CorrelationData", b"") or b""}
        with self._lock:
            self.messages.append(record)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def blob(self) -> bytes:
        with self._lock:
            parts = [m["topic"].encode() + b"\0" + m["payload"] + b"\0" + m["correlation"]
                     + json.dumps(m["properties"], default=str).encode() for m in self.messages]
        return b"\n".join(parts)


def leaks(name: str, data: bytes) -> list[str]:
    """Every forbidden string found in `data` (any case; UTF-8, UTF-16 LE and BE)."""
    low = data.lower()
    found = []
    for needle in FORBIDDEN:
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            if needle.lower().encode(encoding) in low:
                found.append(f"{name}: {needle!r} ({encoding})")
    return found


def wait_until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ the run


@pytest.fixture
def chatty_broker():
    """The harness's Mosquitto, logging everything it can (connections with client ids,
    every packet with its topic): its log is part of the capture."""
    if find_mosquitto() is None:
        pytest.fail(MOSQUITTO_HINT)
    broker = LocalMosquitto(extra_config="log_type all\nconnection_messages true\n").start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.workdir, ignore_errors=True)


def test_no_identifier_leaves_a_site_in_any_byte(tmp_path, chatty_broker):
    started = time.monotonic()
    port = chatty_broker.port
    inputs = {name: write_inputs(tmp_path / "hospitals", i, name)
              for i, name in enumerate(SITES)}
    for site_dir, _export, files in inputs.values():
        assert_inputs_hold_the_canaries(site_dir, files)
    n_files = N_PATIENTS * SCANNER.n_slices
    logs = tmp_path / "logs"
    logs.mkdir()

    plan = dataclasses.replace(
        demo_plan(list(SITES), rounds=2, seed=0), federation=FED, round_deadline_s=90.0,
        min_sites=3,
        model=ModelSpec("cnn_fused", hidden=(), conv_channels=(2,), kernel_size=3),
        training=TrainingSpec(local_epochs=1, batch_size=16, learning_rate=0.01,
                              optimizer="adam"),
        imaging=ImagingSpec(depth=4, size=16))
    coord_cfg, plan_file, coord_state = write_coordinator_files(tmp_path / "coord", plan, port)

    spy = WireSpy(port, "capture-spy")
    outputs: dict[str, bytes] = {}
    writer = None
    try:
        # alpha: the PACS export read once by `fedsilo ingest` (files stay where they are).
        a_dir, a_export, _ = inputs["alpha"]
        run = subprocess.run([sys.executable, "-m", "agent", "ingest", str(a_export), "--state",
                              str(a_dir / "state"), "--plan", str(plan_file), "--json"],
                             capture_output=True, timeout=300)
        outputs["fedsilo ingest"] = run.stdout + run.stderr
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout)["stored"] == n_files

        # beta: the export copied into its watch folder, one file that is not DICOM, and one
        # an exporter still holds open for writing (the watch folder says so after 30 s).
        b_dir, b_export, _ = inputs["beta"]
        watch = b_dir / "watch"
        shutil.copytree(b_export, watch)
        (watch / PATIENT_FOLDER).mkdir()
        (watch / PATIENT_FOLDER / f"{FILE_PREFIX}_broken.dcm").write_bytes(
            b"CANARYJUNK1188 not a DICOM file, PatientName=CANARYPN7731^JANE")
        still_writing = watch / PATIENT_FOLDER / f"{FILE_PREFIX}_still_writing.dcm"
        writer = open(still_writing, "wb")  # noqa: SIM115 - held open across the run
        writer.write(bytes(128) + b"DICM")
        writer.flush()
        # gamma: its listener receives the export from storescu (the PACS).
        g_dir, _g_export, g_files = inputs["gamma"]
        g_port = free_port()
        configs = {
            "alpha": site_config(a_dir, "alpha", port, None),
            "beta": site_config(b_dir, "beta", port, {"watch_dir": str(watch)}),
            "gamma": site_config(g_dir, "gamma", port, {
                "listen": True, "ae_title": "FEDSILO", "port": g_port, "bind": "127.0.0.1",
                "allowed_callers": ["PACS"]}),
        }
        site_logs = {name: logs / f"{name}.log" for name in SITES}
        procs = {name: start_site(configs[name], site_logs[name]) for name in SITES}
        wait_until(lambda: listening(g_port), 60, "gamma's DICOM listener")
        sent = subprocess.run(["storescu", "-aet", "PACS", "-aec", "FEDSILO", "127.0.0.1",
                               str(g_port), *map(str, g_files)],
                              capture_output=True, text=True, timeout=180)
        assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
        for name in ("beta", "gamma"):
            read_retained(port, topics.site_status(FED, name),
                          lambda d: d.get("ingest_stored", 0) >= n_files, timeout=120)
        assert [p for p in watch.rglob("*.dcm") if p != still_writing] == [], \
            "the watch folder moved every file in but the one being written"
        wait_until(lambda: b"holds it open for writing" in site_logs["beta"].read_bytes(), 60,
                   "the watch folder's warning about a file still being written")

        coordinator = start_coordinator(coord_cfg, plan_file, logs / "coordinator.log")
        assert coordinator.wait(timeout=300) == 0
        assert stop_all(list(procs.values()), timeout=60) == [0, 0, 0]

        for label, extra in (("fedsilo status --json", ["--json"]), ("fedsilo status", [])):
            st = subprocess.run([sys.executable, "-m", "agent", "status", "--broker",
                                 f"127.0.0.1:{port}", *extra], capture_output=True, timeout=60)
            assert st.returncode == 0, st.stderr[-2000:]
            outputs[label] = st.stdout + st.stderr
            if extra:
                snapshot = json.loads(st.stdout)
        assert sorted(snapshot["federations"][FED]["sites"]) == list(SITES)

        # gamma again, killed without a goodbye: the broker publishes its will.
        again = start_site(configs["gamma"], logs / "gamma-again.log")
        wait_until(lambda: b"waiting for a new run" in (logs / "gamma-again.log").read_bytes(),
                   60, "the restarted site to see the finished run")
        again.send_signal(signal.SIGKILL)
        again.wait(10)
        down = read_retained(port, topics.site_status(FED, "gamma"),
                             lambda d: d.get("state") == "offline", timeout=30)
        assert down["offline_reason"] == "connection_lost"

        # Retained messages as a newcomer sees them (status, finished, discovery).
        late = WireSpy(port, "capture-retained")
        time.sleep(2.0)
        late.stop()
    finally:
        spy.stop()
        if writer is not None:
            writer.close()
    chatty_broker.stop()  # flushes its log

    # ------------------------------------------------------------- the capture is the run
    messages = spy.messages
    assert len(messages) >= 50, len(messages)
    sent_topics = {m["topic"] for m in messages}
    for name in SITES:
        assert any(t.startswith(f"fedsilo/v1/{FED}/site/{name}/") and "/status" not in t
                   for t in sent_topics), f"no update from {name} captured"
    assert any(m["properties"] for m in messages), "no MQTT 5 properties captured"
    wills = [m for m in messages if m["topic"] == topics.site_status(FED, "gamma")
             and m["payload"] and json.loads(m["payload"]).get("offline_reason") ==
             "connection_lost"]
    assert wills, "the killed site's will was not captured"
    retained = {m["topic"] for m in late.messages if m["retain"]}
    assert {topics.site_status(FED, s) for s in SITES} <= retained, retained
    assert topics.coordinator_status(FED) in retained

    for path in sorted(logs.iterdir()):
        outputs[path.name] = path.read_bytes()
    coord_log = outputs["coordinator.log"].decode()
    assert "round 1" in coord_log and "round 2" in coord_log, coord_log[-3000:]
    for name in SITES:
        text = outputs[f"{name}.log"].decode()
        assert "round 1: training on" in text and "round 2: training on" in text, text[-3000:]
    assert "quarantined a file from watch: not_dicom" in outputs["beta.log"].decode()
    broker_log = (chatty_broker.workdir / "mosquitto.log").read_bytes()
    outputs["mosquitto.log"] = broker_log
    for client in ("capture-spy", "capture-retained"):
        assert client.encode() in broker_log, "the broker log lacks connection messages"
    assert b"New client connected" in broker_log and b"Received PUBLISH" in broker_log
    for path in sorted(p for p in coord_state.rglob("*") if p.is_file()):
        outputs[f"coordinator state {path.relative_to(coord_state)}"] = path.read_bytes()
    assert any(name.startswith("coordinator state ") for name in outputs)

    # ------------------------------------------------------------- and holds no canary
    found = leaks("MQTT", spy.blob()) + leaks("MQTT retained", late.blob())
    for name, data in outputs.items():
        found += leaks(name, data)
    assert not found, "\n".join(found)
    print(f"\ncanary run: {len(messages)} MQTT messages, {sum(map(len, outputs.values()))} "
          f"bytes of output, {time.monotonic() - started:.0f} s")

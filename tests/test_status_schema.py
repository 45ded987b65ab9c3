"""The monitoring contract: the retained status validates against docs/status.schema.json, and
the real `mosquitto_sub` that IT would point their tools at reads status and metrics of a
running federation as flat JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from agent.federation.broker import find_mosquitto
from agent.ops.status import State, host_vitals, offline_status, status_document
from tests.fedharness import CoordinatorThread, breast_cancer_sites, stop_all
from tests.test_federation import FED, launch, plan_for

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" /
                     "status.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def test_documents_the_agents_make_validate(tmp_path):
    site = status_document(role="site", identity="north", federation=FED, state=State.TRAINING,
                           round=3, extra={"bytes_sent": 10, "throttled": False,
                                           "last_round_ok_ts": None, **host_vitals(tmp_path)})
    VALIDATOR.validate(site)
    VALIDATOR.validate({**site, "model_sha256": "142832be6ac9"})
    assert site["disk_free_gib"] > 0 and site["memory_percent"] > 0
    VALIDATOR.validate(json.loads(offline_status(role="coordinator", identity="coordinator",
                                                 federation=FED, reason="connection_lost")))


@pytest.mark.parametrize("change", [
    {"state": "napping"},                      # not a state
    {"round": "3"},                            # wrong type
    {"extra": {"nested": True}},               # not flat
    {"state": "offline"},                      # offline without a reason
    {"schema": 1},                             # another layout
    {"model_sha256": "not a digest"},          # the model held: 12 hex digits
])
def test_documents_breaking_the_contract_do_not(change):
    doc = status_document(role="site", identity="north", federation=FED, state=State.IDLE,
                          round=1)
    doc.update(change)
    assert not VALIDATOR.is_valid(doc)
    doc = status_document(role="site", identity="north", federation=FED, state=State.IDLE,
                          round=1)
    del doc["last_error"]
    assert not VALIDATOR.is_valid(doc)


@pytest.mark.integration
def test_mosquitto_sub_reads_status_and_metrics_of_a_running_federation(tmp_path, mosquitto):
    mosquitto_sub = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    if find_mosquitto() is None or not Path(mosquitto_sub).exists():
        pytest.fail("mosquitto_sub missing: `make test` installs mosquitto-clients")
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    root = f"fedsilo/v1/{FED}"
    sub = subprocess.Popen([mosquitto_sub, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-v",
                            "-q", "1", "-t", f"{root}/site/+/status", "-t",
                            f"{root}/site/+/metrics", "-t", f"{root}/coordinator/status",
                            "-W", "60"], stdout=subprocess.PIPE, text=True)
    try:
        procs = launch(tmp_path, mosquitto.port, names, tables[:2])
        CoordinatorThread(plan_for(features, names, rounds=2), mosquitto.port,
                          tmp_path / "coord").start().join(timeout=120)
        assert stop_all(procs) == [0, 0]
    finally:
        sub.terminate()
        out, _ = sub.communicate(timeout=10)
    statuses, metrics = [], []
    for line in out.splitlines():
        topic, _, payload = line.partition(" ")
        if not payload:
            continue  # a cleared retained message
        doc = json.loads(payload)
        assert all(not isinstance(v, (dict, list)) for v in doc.values()), doc  # flat
        (statuses if topic.endswith("/status") else metrics).append(doc)
    for doc in statuses:
        VALIDATOR.validate(doc)
    seen = {(d["role"], d["id"], d["state"]) for d in statuses}
    assert {("site", n, "offline") for n in names} <= seen  # explicit offline on clean stop
    assert ("coordinator", "coordinator", "finished") in seen
    # both ends say how they reach the broker (IT compares them when one side cannot)
    for doc in statuses:
        if doc["state"] != "offline":
            assert doc["broker_url"] == f"mqtt://127.0.0.1:{mosquitto.port}", doc
            assert doc["broker_proxy"] is None and doc["reconnects"] == 0, doc
    assert any(d["state"] == "training" for d in statuses)
    trained = [d for d in statuses if d["role"] == "site" and d["last_round_ok_ts"]]
    assert trained and all(d["cpu_percent"] is not None for d in trained)
    assert sorted((m["site"], m["round"]) for m in metrics) == [
        (n, r) for n in names for r in (1, 2)]

    # `fedsilo status`: the same retained documents, for IT's scripts and eyes
    def fedsilo(*args):
        return subprocess.run([sys.executable, "-m", "agent", "status", *args],
                              capture_output=True, text=True, timeout=60)

    snap = json.loads(fedsilo("--broker", f"127.0.0.1:{mosquitto.port}", "--json").stdout)
    fed = snap["federations"][FED]
    assert fed["coordinator"]["state"] == "finished", fed["coordinator"]
    assert {s: d["state"] for s, d in fed["sites"].items()} == {n: "offline" for n in names}
    for doc in [fed["coordinator"], *fed["sites"].values()]:
        VALIDATOR.validate(doc)
    text = fedsilo("--broker", f"127.0.0.1:{mosquitto.port}").stdout
    assert f"federation {FED}" in text and all(n in text for n in names)
    bad = fedsilo("--broker", "nohost")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_home_assistant_discovery_points_at_status_keys_that_exist():
    from agent.ops.status import home_assistant_discovery
    from agent.security.brokerconf import Roster, acl_text

    status_topic = "fedsilo/v1/stroke-eu/site/north-1/status"
    configs = home_assistant_discovery("stroke-eu", "north-1", status_topic)
    assert len(configs) == 5
    for topic, payload in configs:
        assert topic.startswith("homeassistant/sensor/fedsilo_stroke_eu_north_1_")
        assert topic.endswith("/config")
        doc = json.loads(payload)
        assert doc["state_topic"] == status_topic
        key = doc["value_template"].removeprefix("{{ value_json.").removesuffix(" }}")
        assert key in SCHEMA["properties"], key
    # the generated broker ACL lets exactly that site write its own discovery topics
    acl = acl_text(Roster("stroke-eu", ("north-1",)))
    assert all(f"topic write {topic}" in acl for topic, _ in configs)


@pytest.mark.integration
def test_a_site_with_discovery_on_announces_its_sensors(tmp_path, mosquitto):
    from tests.fedharness import start_site, write_site_config
    from tests.test_lifecycle import read_retained

    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    cfg.write_text(cfg.read_text() + "\n[monitoring]\nhome_assistant_discovery = true\n")
    proc = start_site(cfg, tmp_path / "north.log")
    try:
        uid = f"fedsilo_{FED}_north_state".replace("-", "_")
        doc = read_retained(mosquitto.port, f"homeassistant/sensor/{uid}/config")
        assert doc["state_topic"] == f"fedsilo/v1/{FED}/site/north/status"
        assert doc["device"]["identifiers"] == [f"fedsilo_{FED}_north"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)

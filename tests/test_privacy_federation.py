"""Privacy in whole federations: real Mosquitto, sites as `fedsilo site run` processes."""

from __future__ import annotations

import csv
import json
import threading

import paho.mqtt.client as mqtt
import pytest

from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_site,
    stop_all,
    write_site_config,
)
from tests.test_federation import FED, plan_for

pytestmark = pytest.mark.integration


class Recorder:
    """Every message on the broker (retained ones too), kept in order of arrival."""

    def __init__(self, port: int) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dpo-recorder",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("fedsilo/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def manifests_from(self, site: str) -> list[dict]:
        """The headers of the manifests a site published (envelopes start with a JSON
        header line; see agent/federation/envelope.py)."""
        prefix = f"fedsilo/v1/{FED}/site/{site}/"
        out = []
        with self.lock:
            for msg in self.messages:
                if msg.topic.startswith(prefix) and "/manifest" in msg.topic and msg.payload:
                    out.append(_header(msg.payload))
        return out

    def status_of(self, site: str) -> dict:
        topic = f"fedsilo/v1/{FED}/site/{site}/status"
        with self.lock:
            docs = [json.loads(m.payload) for m in self.messages
                    if m.topic == topic and m.payload]
        return docs[-1]


def _header(payload: bytes) -> dict:
    from agent.federation.envelope import decode

    return decode(payload, max_body=1 << 30).header


def _tiny_table(source, dest, rows: int):
    with open(source, newline="") as fh:
        lines = list(csv.reader(fh))
    with open(dest, "w", newline="") as fh:
        csv.writer(fh).writerows(lines[:rows + 1])
    return dest


def test_sites_below_min_cell_or_refusing_the_plan_send_nothing_but_why(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    tiny = _tiny_table(tables[0], tmp_path / "data" / "tiny.csv", rows=9)  # 9 patients
    names = ["north", "south", "east", "tiny", "picky"]
    plan = plan_for(features, names, rounds=2, min_sites=3)
    recorder = Recorder(mosquitto.port)
    site_tables = {"north": tables[0], "south": tables[1], "east": tables[2], "tiny": tiny,
                   "picky": tables[1]}
    privacy = {"picky": {"allowed_features": [f.name for f in features[:-1]]}}
    procs = [start_site(write_site_config(tmp_path / "sites", name, FED, mosquitto.port,
                                          site_tables[name], privacy=privacy.get(name)),
                        tmp_path / f"{name}.log") for name in names]
    rounds: list[dict] = []
    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=rounds.append).start().join(timeout=180)
    assert stop_all(procs) == [0] * len(names)
    recorder.close()
    why = {"tiny": "below_min_cell", "picky": f"feature_not_allowed:{features[-1].name}"}
    assert final["sites"] == ["east", "north", "south"]
    assert final["declined"] == why
    for record in rounds:
        assert record["declined"] == why
        assert set(record["per_site"]) == {"east", "north", "south"}
    for site, reason in why.items():
        sent = recorder.manifests_from(site)
        assert len(sent) >= 4  # statistics, two rounds, final evaluation: each declined
        assert {h["body_kind"] for h in sent} == {"declined"}
        assert all(h["body_len"] == 0 and h["meta"]["reason"] == reason for h in sent)
        assert recorder.status_of(site)["declined_reason"] == reason
        assert "metrics" not in " ".join(m.topic for m in recorder.messages
                                         if f"/site/{site}/" in m.topic)
    assert recorder.status_of("north")["declined_reason"] is None

"""Privacy in whole federations: real Mosquitto, sites as `fedsilo site run` processes."""

from __future__ import annotations

import csv
import dataclasses
import json
import threading

import numpy as np
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


def _recorded_bodies(recorder: Recorder, site: str, kind: str) -> list[tuple[dict, bytes]]:
    """(manifest header, whole body) of every `kind` a site published, rebuilt from chunks."""
    from agent.federation.envelope import decode

    chunks: dict[tuple[str, int], bytes] = {}
    heads = []
    prefix = f"fedsilo/v1/{FED}/site/{site}/"
    with recorder.lock:
        msgs = list(recorder.messages)
    for msg in msgs:
        if not msg.topic.startswith(prefix + "update/") or not msg.payload:
            continue
        env = decode(msg.payload, max_body=1 << 30)
        if "/manifest" in msg.topic and env.header["body_kind"] == kind:
            heads.append(env.header)
        elif "/chunk/" in msg.topic:
            chunks[env.header["nonce"], env.header["index"]] = env.body
    out = []
    for h in heads:
        body = b"".join(chunks.get((h["nonce"], i), b"") for i in range(len(h["chunk_digests"])))
        if len(body) == h["body_len"]:
            out.append((h, body))
    return out


def _secure_plan(features, names, **privacy):
    from agent.config import CompressionSpec, PrivacySpec

    return dataclasses.replace(
        plan_for(features, names, rounds=3, min_sites=2, deadline=8.0),
        compression=CompressionSpec(quantize="int8"),
        privacy=PrivacySpec(**privacy))


def _dealt_tables(tables, directory, k: int):
    """The rows of the harness's tables dealt round-robin into k tables."""
    rows, header = [], None
    for t in tables:
        with open(t, newline="") as fh:
            lines = list(csv.reader(fh))
        header = lines[0]
        rows += lines[1:]
    out = []
    for i in range(k):
        path = directory / f"dealt{i}.csv"
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows[i::k]])
        out.append(path)
    return out


def test_secure_rounds_survive_sites_lost_before_and_after_their_upload_and_open_only_sums(
        tmp_path, mosquitto, caplog):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["central", "east", "north", "south", "west"]
    tables = _dealt_tables(tables, tmp_path / "data", len(names))
    plan = _secure_plan(features, names, secure_aggregation=True)
    recorder = Recorder(mosquitto.port)
    # west is killed (SIGKILL) right after its round-2 masked update went out, before it
    # could give its self-mask secret: recovered from its peers' Shamir shares. east is killed
    # in round 3 after masking, before sending: the round is run again among the others.
    crash = {"west": "site.residual_saved:4", "east": "site.masked:3"}
    procs = []
    for name, table in zip(names, tables, strict=True):
        cfg = write_site_config(tmp_path / "sites", name, FED, mosquitto.port, table)
        env = {"FEDSILO_TEST_CRASH_AT": crash[name]} if name in crash else None
        procs.append(start_site(cfg, tmp_path / f"{name}.log", env=env))
    rounds: list[dict] = []
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=rounds.append).start()
    final = coord.join(timeout=240)
    codes = stop_all(procs)
    recorder.close()
    assert dict(zip(names, codes, strict=True)) == {"central": 0, "east": -9, "north": 0,
                                                    "south": 0, "west": -9}
    epochs = [r["secure"]["epochs"] for r in rounds]
    assert [len(e) for e in epochs] == [1, 1, 2]
    assert epochs[0][0]["recovered"] == []
    assert epochs[1][0]["arrived"] == names and epochs[1][0]["recovered"] == ["west"]
    assert epochs[2][0]["members"] == names
    assert epochs[2][0]["arrived"] == ["central", "north", "south"]
    assert epochs[2][1]["members"] == epochs[2][1]["arrived"] == ["central", "north", "south"]
    assert rounds[1]["sites"] == names and rounds[2]["sites"] == ["central", "north", "south"]
    assert final["eval"]["auc"] > 0.9  # the masked sums trained a real model
    # Every masked update on the wire is uniform noise; seeds were revealed only for the
    # epochs that completed, so no single update (nor a partial sum) could be opened.
    from tests.test_secagg import _chi_square_p

    revealed_epochs, secrets = set(), []
    for site in names:
        for head, body in _recorded_bodies(recorder, site, "update"):
            assert head["meta"]["update"]["codec"] == "masked"
            lane = np.frombuffer(body, np.uint8)
            assert _chi_square_p(np.bincount(lane, minlength=256)) > 1e-6
        for head, _ in _recorded_bodies(recorder, site, "reveal"):
            revealed_epochs.add((head["round"], head["meta"]["epoch"]))
            secrets += [head["meta"]["seed"], *head["meta"]["shares"].values()]
    assert len(secrets) > 10
    logged = caplog.text + "".join((tmp_path / f"{n}.log").read_text() for n in names)
    assert "round 2: west sent its masked update but not its self-mask secret" in logged
    assert not [s for s in secrets if s in logged]  # no secret or share reaches a log
    completed = {(r["round"], r["secure"]["epochs"][-1]["epoch"]) for r in rounds}
    assert revealed_epochs == completed
    # what the coordinator kept: the global model and its checkpoint, no update of anyone
    kept = sorted(p.name for p in (tmp_path / "coord").iterdir())
    assert all(not n.startswith(("update", "site")) for n in kept), kept


def test_client_dp_clips_every_update_counts_epsilon_and_stops_at_the_budget(tmp_path,
                                                                             mosquitto):
    from agent.privacy.accountant import PrivacyAccountant

    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "east"]
    sigma, clip, delta = 1.5, 0.2, 1e-5
    acc = PrivacyAccountant()
    for _ in range(2):
        acc.step(sigma)
    two = acc.epsilon(delta)[0]
    plan = dataclasses.replace(
        _secure_plan(features, names, dp="client", dp_clip=clip, dp_noise_multiplier=sigma,
                     dp_epsilon=two * 1.01, dp_delta=delta), rounds=5)
    recorder = Recorder(mosquitto.port)
    procs = [start_site(write_site_config(tmp_path / "sites", n, FED, mosquitto.port, t),
                        tmp_path / f"{n}.log") for n, t in zip(names, tables, strict=True)]
    rounds: list[dict] = []
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=rounds.append).start()
    final = coord.join(timeout=180)
    assert stop_all(procs) == [0, 0, 0]
    recorder.close()
    assert [r["round"] for r in rounds] == [1, 2]  # a third round would exceed the budget
    assert rounds[-1]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert final["sites"] == sorted(names)
    checkpoint = json.loads((tmp_path / "coord" / "checkpoint.json").read_text())
    assert set(checkpoint["privacy_accountants"]) == {"federation"}
    import kernels
    from agent.federation.aggregate import accumulate_update

    k = kernels.get_backend("cpu")
    norms = []
    for site in names:
        sent = _recorded_bodies(recorder, site, "update")
        assert len(sent) == 2
        for head, body in sent:
            v = np.zeros(head["meta"]["update"]["n"], dtype=np.float32)
            accumulate_update(v, 1.0, body, head["meta"]["update"], plan.compression, k)
            norms.append(float(np.linalg.norm(v.astype(np.float64))))
    assert max(norms) <= clip * (1 + 1e-6)
    assert max(norms) > clip * 0.5  # the bound was reached: clipping really happened
    # each site's ledger records its two updates with the epsilon they brought it to
    from agent.privacy.ledger import Ledger

    for site in names:
        entries = list(Ledger.for_state_dir(tmp_path / "sites" / site).entries())
        ups = [e for e in entries if e["kind"] == "update"]
        assert [e["round"] for e in ups] == [1, 2]
        assert ups[-1]["epsilon"] == pytest.approx(two, rel=1e-9)
        assert {e["kind"] for e in entries} >= {"stats", "update", "metrics", "evaluation"}


def test_secure_aggregation_with_client_dp_and_dp_sgd_federations_account_their_epsilon(
        tmp_path, mosquitto):
    """Noise split among the members of secure rounds; then DP-SGD at each site, with one
    accountant per site (its own sampling rate) in the coordinator's checkpoint."""
    from agent.privacy.accountant import PrivacyAccountant

    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "east"]
    procs = [start_site(write_site_config(tmp_path / "sites", n, FED, mosquitto.port, t),
                        tmp_path / f"{n}.log") for n, t in zip(names, tables, strict=True)]
    secure_dp = dataclasses.replace(
        _secure_plan(features, names, secure_aggregation=True, dp="client", dp_clip=0.5,
                     dp_noise_multiplier=0.8, dp_epsilon=100.0), rounds=2)
    rounds: list[dict] = []
    CoordinatorThread(secure_dp, mosquitto.port, tmp_path / "coord1",
                      on_round=rounds.append).start().join(timeout=180)
    acc = PrivacyAccountant()
    acc.step(0.8, count=2)
    assert rounds[-1]["epsilon"] == pytest.approx(acc.epsilon(1e-5)[0], rel=1e-9)
    assert all(len(r["secure"]["epochs"]) == 1 for r in rounds)
    assert stop_all(procs) == [0, 0, 0]

    procs = [start_site(write_site_config(tmp_path / "sites2", n, FED, mosquitto.port, t),
                        tmp_path / f"{n}-2.log") for n, t in zip(names, tables, strict=True)]
    dp_sgd = dataclasses.replace(
        _secure_plan(features, names, dp="sample", dp_clip=1.0, dp_noise_multiplier=1.1,
                     dp_epsilon=50.0), rounds=2)
    rounds = []
    coord = CoordinatorThread(dp_sgd, mosquitto.port, tmp_path / "coord2",
                              on_round=rounds.append).start()
    final = coord.join(timeout=180)
    assert stop_all(procs) == [0, 0, 0]
    assert final["sites"] == sorted(names)
    rows = coord.coordinator.site_rows
    worst = 0.0
    for site in names:  # each site's DP-SGD steps: q = batch / rows, ceil(rows / batch) a round
        a = PrivacyAccountant()
        b = dp_sgd.training.batch_size
        a.step(1.1, q=b / rows[site], count=2 * -(-rows[site] // b))
        worst = max(worst, a.epsilon(1e-5)[0])
    assert rounds[-1]["epsilon"] == pytest.approx(worst, rel=1e-9)
    checkpoint = json.loads((tmp_path / "coord2" / "checkpoint.json").read_text())
    assert set(checkpoint["privacy_accountants"]) == set(names)

"""Whole federations against a real Mosquitto: sites are `fedsilo site run` processes."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

import kernels
from agent.config import CompressionSpec, ModelSpec, Plan, TrainingSpec
from agent.demo.baselines import score_alone_and_pooled
from agent.federation import envelope, topics
from agent.ingest.tables import load_table
from agent.learn import metrics
from agent.learn.modelfile import load_model
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization
from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_site,
    stop_all,
    write_site_config,
)

pytestmark = pytest.mark.integration

FED = "bc-test"


def plan_for(features, sites, *, rounds=12, min_sites=None, deadline=20.0) -> Plan:
    return Plan(federation=FED, sites=tuple(sites), rounds=rounds,
                min_sites=min_sites or len(sites), round_deadline_s=deadline, target="label",
                features=features, model=ModelSpec("logistic"),
                training=TrainingSpec(local_epochs=1, batch_size=16, learning_rate=0.05,
                                      optimizer="sgd", momentum=0.9))


def launch(tmp_path: Path, port: int, names, tables):
    procs = []
    for name, table in zip(names, tables, strict=True):
        cfg = write_site_config(tmp_path / "sites", name, FED, port, table)
        procs.append(start_site(cfg, tmp_path / f"{name}.log"))
    return procs


def test_three_sites_match_pooled_model_on_real_data(tmp_path, mosquitto):
    tables, test_csv, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "east"]
    plan = plan_for(features, names)
    metrics_seen: list[dict] = []
    monitor = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="it-monitor")
    monitor.on_message = lambda _c, _u, msg: metrics_seen.append(json.loads(msg.payload))
    monitor.connect("127.0.0.1", mosquitto.port)
    monitor.subscribe(f"fedsilo/v1/{FED}/site/+/metrics", qos=1)
    monitor.loop_start()
    procs = launch(tmp_path, mosquitto.port, names, tables)
    rounds_seen = []
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=rounds_seen.append).start()
    final = coord.join(timeout=180)
    assert stop_all(procs) == [0, 0, 0]
    monitor.loop_stop()
    monitor.disconnect()
    # IT monitoring sees flat per-round metrics from every site, aggregate numbers only.
    assert sorted((m["site"], m["round"]) for m in metrics_seen) == sorted(
        (n, r) for n in names for r in range(1, plan.rounds + 1))
    assert all(set(m) >= {"n_samples", "train_loss", "eval_auc", "eval_n"} for m in metrics_seen)
    assert not any(isinstance(v, (dict, list)) for m in metrics_seen for v in m.values())

    assert [r["round"] for r in rounds_seen] == list(range(1, plan.rounds + 1))
    assert all(r["sites"] == sorted(names) for r in rounds_seen)
    # FedAvg weights by samples: the per-site sample counts add up to the round's weight.
    first = rounds_seen[0]
    assert sum(s["n_samples"] for s in first["per_site"].values()) == first["samples"]
    assert final["sites"] == sorted(names) and final["eval"]["n"] > 0

    k = kernels.get_backend("auto")
    test = load_table(test_csv, features, "label", "mean")
    model = load_model(tmp_path / "coord" / "model")
    p = predict_proba(model.layout, model.params,
                      apply_standardization(test.x, model.mean, model.scale), k)
    federated = metrics.roc_auc(test.y, p)
    _alone, pooled = score_alone_and_pooled(plan, tables, test, k)
    assert federated >= pooled - 0.01, (federated, pooled)

    saved = json.loads((tmp_path / "coord" / "metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"] if "round" in r][:plan.rounds] == \
        list(range(1, plan.rounds + 1))


def test_site_joining_after_round_one_takes_part_later(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "late"]
    plan = plan_for(features, names, rounds=5, min_sites=2, deadline=4.0)
    procs = launch(tmp_path, mosquitto.port, names[:2], tables[:2])
    late: list = []

    def on_round(record):
        if record["round"] == 1:
            late.extend(launch(tmp_path, mosquitto.port, names[2:], tables[2:]))

    rounds_seen = []
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=lambda r: (rounds_seen.append(r), on_round(r))).start()
    final = coord.join(timeout=180)
    assert stop_all(procs + late) == [0, 0, 0]
    assert rounds_seen[0]["sites"] == ["north", "south"]
    assert any("late" in r["sites"] for r in rounds_seen[1:])
    assert "late" in final["sites"]
    # The late site found the round in progress from the retained manifest and asked again for
    # the chunks that went by before it connected.
    assert "asking coordinator again for" in (tmp_path / "late.log").read_text()


def test_garbage_on_fedsilo_topics_is_dropped_and_federation_finishes(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "east"]
    plan = plan_for(features, names, rounds=4)
    procs = launch(tmp_path, mosquitto.port, names, tables)
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord").start()

    stop = threading.Event()
    sent = {"n": 0}

    def vandal():
        rng = np.random.default_rng(7)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="vandal")
        c.connect("127.0.0.1", mosquitto.port)
        c.loop_start()
        forged = envelope.encode({"kind": "manifest", "federation": FED, "round": 1,
                                  "sender": "north", "body_kind": "update",
                                  "body_len": 10**12, "chunk_size": 1, "chunk_digests": [],
                                  "body_digest": "0" * 64, "nonce": "x", "created": 0})
        while not stop.is_set():
            rnd = coord.coordinator.current_round
            for topic in (topics.site_manifest(FED, "north", rnd),
                          topics.site_chunk(FED, "south", rnd, 0),
                          topics.site_manifest(FED, "mallory", rnd),
                          topics.coordinator_chunk(FED, rnd, 0),
                          topics.site_req(FED, "east")):
                junk = rng.bytes(int(rng.integers(1, 3000)))
                for payload in (junk, b"FSLO\x01\x00" + junk, forged):
                    c.publish(topic, payload, qos=1)
                    sent["n"] += 1
            time.sleep(0.05)
        c.loop_stop()
        c.disconnect()

    t = threading.Thread(target=vandal, daemon=True)
    t.start()
    try:
        final = coord.join(timeout=180)
    finally:
        stop.set()
        t.join(5)
    assert stop_all(procs) == [0, 0, 0]
    assert sent["n"] > 50
    assert final["sites"] == sorted(names)
    rejected = coord.coordinator.peer.rejected
    assert rejected["bad_magic"] > 0 and rejected["bad_field"] > 0, rejected
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in names)
    assert "dropped message on fedsilo/v1/bc-test/coordinator/round/" in logs
    assert os.path.exists(tmp_path / "coord" / "model" / "model.json")


def test_model_larger_than_one_chunk_travels_in_chunks(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    plan = dataclasses.replace(plan_for(features, names, rounds=2),
                               model=ModelSpec("mlp", hidden=(600, 600)))
    procs = launch(tmp_path, mosquitto.port, names, tables[:2])
    rounds_seen = []
    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=rounds_seen.append).start().join(timeout=180)
    assert stop_all(procs) == [0, 0]
    model = load_model(tmp_path / "coord" / "model")
    assert model.layout.size * 4 > envelope.CHUNK_SIZE  # two chunks per body at least
    # Each site's update (float32, zstd'ed) still needs several chunks.
    assert all(site["bytes_up"] > envelope.CHUNK_SIZE
               for r in rounds_seen for site in r["per_site"].values())
    assert final["sites"] == names


def test_compressed_updates_train_as_well_and_send_far_fewer_bytes(tmp_path, mosquitto):
    """int8 codes + top-10 % with error feedback: the model matches the uncompressed run's
    quality while each upload is a fraction of float32; the residual survives in the site's
    state directory."""
    tables, test_csv, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    plan = dataclasses.replace(plan_for(features, names, rounds=12),
                               model=ModelSpec("mlp", hidden=(64,)),
                               compression=CompressionSpec(quantize="int8", topk_fraction=0.1,
                                                           block=64))
    procs = launch(tmp_path, mosquitto.port, names, tables[:2])
    rounds_seen = []
    CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                      on_round=rounds_seen.append).start().join(timeout=180)
    assert stop_all(procs) == [0, 0]
    model = load_model(tmp_path / "coord" / "model")
    raw = model.layout.size * 4
    ups = [s["bytes_up"] for r in rounds_seen for s in r["per_site"].values()]
    assert len(ups) == 2 * plan.rounds and max(ups) * 8 < raw, (max(ups), raw)
    assert all(s["bytes_down"] > 0 for r in rounds_seen for s in r["per_site"].values())
    for name in names:
        [residual] = (tmp_path / "sites" / name).glob("residual-*.f32")
        assert residual.stat().st_size == raw
        assert residual.stat().st_mode & 0o077 == 0

    k = kernels.get_backend("auto")
    test = load_table(test_csv, features, "label", "mean")
    p = predict_proba(model.layout, model.params,
                      apply_standardization(test.x, model.mean, model.scale), k)
    _alone, pooled = score_alone_and_pooled(plan, tables[:2], test, k)
    assert metrics.roc_auc(test.y, p) >= pooled - 0.02

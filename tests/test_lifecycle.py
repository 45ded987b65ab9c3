"""Process lifecycle against a real Mosquitto: retained status, last will, resume."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.federation import topics
from agent.federation.coordinator import Stopped
from agent.ops.status import STATUS_SCHEMA_VERSION
from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_site,
    stop_all,
    write_site_config,
)
from tests.test_federation import FED, launch, plan_for

pytestmark = pytest.mark.integration


def read_retained(port: int, topic: str, want=lambda doc: True, timeout: float = 10.0) -> dict:
    """Subscribe with a fresh client and return the retained JSON status once `want` holds."""
    seen: list[dict] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    c.on_message = lambda _c, _u, msg: seen.append(json.loads(msg.payload)) if msg.payload \
        else None
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if seen and want(seen[-1]):
                return seen[-1]
            time.sleep(0.05)
    finally:
        c.loop_stop()
        c.disconnect()
    raise AssertionError(f"no matching retained message on {topic}; saw {seen[-1:]}")


def test_site_status_is_retained_and_last_will_marks_it_offline(tmp_path, mosquitto):
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    topic = topics.site_status(FED, "north")

    site = start_site(cfg, tmp_path / "north.log")
    up = read_retained(mosquitto.port, topic, lambda d: d["state"] == "idle")
    assert up["id"] == "north" and up["role"] == "site" and up["federation"] == FED
    assert up["schema"] == STATUS_SCHEMA_VERSION and up["version"]
    site.kill()  # a crash: no clean DISCONNECT, so the broker publishes the will
    site.wait()
    down = read_retained(mosquitto.port, topic, lambda d: d["state"] == "offline")
    assert down["offline_reason"] == "connection_lost"

    site = start_site(cfg, tmp_path / "north2.log")
    read_retained(mosquitto.port, topic, lambda d: d["state"] == "idle")
    site.send_signal(signal.SIGTERM)
    assert site.wait(timeout=10) == 0
    down = read_retained(mosquitto.port, topic, lambda d: d["state"] == "offline")
    assert down["offline_reason"] == "stopped"


def test_coordinator_resumes_after_stop_without_redoing_closed_rounds(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "east"]
    plan = plan_for(features, names, rounds=5)
    procs = launch(tmp_path, mosquitto.port, names, tables)
    first_run: list[dict] = []

    def stop_after_two(record):
        first_run.append(record)
        if record["round"] == 2:
            coord.coordinator.stop_event.set()

    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=stop_after_two).start()
    with pytest.raises(Stopped):
        coord.join(timeout=120)
    assert [r["round"] for r in first_run] == [1, 2]
    status = read_retained(mosquitto.port, topics.coordinator_status(FED))
    assert status["state"] == "offline" and status["offline_reason"] == "stopped"

    second_run: list[dict] = []
    again = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=second_run.append).start()
    final = again.join(timeout=120)
    assert [r["round"] for r in second_run] == [3, 4, 5]
    assert again.coordinator.run_id == coord.coordinator.run_id
    assert final["sites"] == sorted(names)
    assert stop_all(procs) == [0, 0, 0]
    done = read_retained(mosquitto.port, topics.coordinator_status(FED),
                         lambda d: d["state"] == "finished")
    assert done["round"] == plan.rounds + 1

    # A finished federation stays finished: a third start does no new round.
    third: list[dict] = []
    CoordinatorThread(plan, mosquitto.port, tmp_path / "coord", on_round=third.append
                      ).start().join(timeout=30)
    assert third == []


def test_federation_survives_a_broker_restart(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south", "east"]
    plan = plan_for(features, names, rounds=6)
    procs = launch(tmp_path, mosquitto.port, names, tables)
    seen: list[dict] = []

    def restart_after_two(record):
        seen.append(record)
        if record["round"] == 2:
            mosquitto.stop()  # persistence is saved on shutdown: sessions and retained state
            time.sleep(1.0)
            mosquitto.start()

    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=restart_after_two).start().join(timeout=180)
    assert stop_all(procs) == [0, 0, 0]
    assert [r["round"] for r in seen] == list(range(1, plan.rounds + 1))
    assert final["sites"] == sorted(names)
    assert all(r["sites"] == sorted(names) for r in seen)
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in names)
    assert "will reconnect" in logs


def test_unparseable_rows_are_skipped_with_reasons_in_log_and_status(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    good_rows = len(tables[0].read_text().splitlines()) - 1
    with open(tables[0], "a") as fh:
        fh.write("1,2,3\n")  # wrong field count
        fh.write(",".join(["abc"] * 30) + ",1\n")  # unparseable numbers
        fh.write(",".join(["1.0"] * 30) + ",\n")  # outcome missing
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    site = start_site(cfg, tmp_path / "north.log")
    CoordinatorThread(plan_for(features, ["north"], rounds=1), mosquitto.port,
                      tmp_path / "coord").start().join(timeout=60)
    assert stop_all([site]) == [0]
    status = read_retained(mosquitto.port, topics.site_status(FED, "north"))
    assert status["state"] == "offline" and status["offline_reason"] == "stopped"
    assert status["rows_read"] == good_rows + 3 and status["rows_skipped"] == 3
    assert status["rows_skipped_reasons"] == \
        "target_missing=1,unparseable:f00=1,wrong_field_count=1"
    log = (tmp_path / "north.log").read_text()
    assert f"kept {good_rows} of {good_rows + 3} rows" in log and "wrong_field_count=1" in log
    assert "abc" not in log  # reasons and counts only, never cell values


def test_a_site_outside_its_training_hours_waits_says_so_and_stops_promptly(
        tmp_path, mosquitto, monkeypatch):
    """North may train only in a window that starts two hours from now: it takes the task,
    does not train, and says `throttled` with the reason; the rounds close on south alone at
    their deadline; SIGTERM still ends the wait at once. South's only hardware profile caps
    the plan's batch of 16 at 8."""
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    base = (Path(__file__).parents[1] / "hardware_profiles" / "base.toml").read_text()
    (profiles / "base.toml").write_text(base.replace("max_batch_size = 1024",
                                                     "max_batch_size = 8"))
    monkeypatch.setenv("FEDSILO_PROFILES_DIR", str(profiles))
    now = dt.datetime.now()
    later = [(now + dt.timedelta(hours=h)).strftime("%H:%M") for h in (2, 3)]
    north = start_site(write_site_config(tmp_path / "sites", "north", FED, mosquitto.port,
                                         tables[0], policy={"training_hours": "-".join(later)}),
                       tmp_path / "north.log")
    south = start_site(write_site_config(tmp_path / "sites", "south", FED, mosquitto.port,
                                         tables[1]), tmp_path / "south.log")
    rounds: list[dict] = []
    final = CoordinatorThread(plan_for(features, ["north", "south"], rounds=2, min_sites=1,
                                       deadline=4.0),
                              mosquitto.port, tmp_path / "coord",
                              on_round=rounds.append).start().join(timeout=120)
    assert [r["sites"] for r in rounds] == [["south"], ["south"]]
    assert final["sites"] == ["south"]
    status = read_retained(mosquitto.port, topics.site_status(FED, "north"),
                           lambda d: d.get("throttled") is True)
    assert status["throttle_reason"] == "outside_training_hours"
    assert status["state"] == "training"
    assert "training paused: outside_training_hours" in (tmp_path / "north.log").read_text()
    started = time.monotonic()
    north.send_signal(signal.SIGTERM)
    assert north.wait(timeout=10) == 0 and time.monotonic() - started < 5
    assert stop_all([south]) == [0]
    assert "batch size 16 capped at 8 by hardware profile base" in \
        (tmp_path / "south.log").read_text()
    down = read_retained(mosquitto.port, topics.site_status(FED, "north"),
                         lambda d: d["state"] == "offline")
    assert down["offline_reason"] == "stopped"


def test_first_training_step_is_timed_from_the_tasks_arrival_not_from_the_wait(
        tmp_path, mosquitto):
    """A site started long before the coordinator: its cold-start figure counts the wait, the
    figure per task does not."""
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    site = start_site(cfg, tmp_path / "north.log")
    read_retained(mosquitto.port, topics.site_status(FED, "north"), lambda d: d["state"] == "idle")
    time.sleep(4.0)  # nobody to train for yet
    CoordinatorThread(plan_for(features, ["north"], rounds=1), mosquitto.port,
                      tmp_path / "coord").start().join(timeout=60)
    assert stop_all([site]) == [0]
    status = read_retained(mosquitto.port, topics.site_status(FED, "north"))
    after_start, after_task = status["first_step_after_start_s"], status["first_step_after_task_s"]
    assert after_start >= 4.0
    assert 0 < after_task < after_start - 3.0
    line = next(x for x in (tmp_path / "north.log").read_text().splitlines()
                if "first training step" in x)
    logged = re.search(r"first training step ([0-9.]+) s after the task arrived \(([0-9.]+) s "
                       r"after process start\)", line)
    assert logged, line
    assert float(logged[1]) == pytest.approx(after_task, abs=0.006)
    assert float(logged[2]) == pytest.approx(after_start, abs=0.006)

"""Chaos: processes killed at random moments, a broker gone for seconds, a site that never
answers. Real Mosquitto and processes; bounded for `make test` (seeded moments). The slow tier
runs more of the same: `make chaos` (FEDSILO_CHAOS_KILLS=40)."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_coordinator,
    stop_all,
    write_coordinator_files,
)
from tests.test_federation import launch, plan_for

pytestmark = pytest.mark.integration
NAMES = ["north", "south", "east"]
KILLS = int(os.environ.get("FEDSILO_CHAOS_KILLS", "10"))


def _closed(state) -> dict[int, str]:
    try:
        doc = json.loads((state / "checkpoint.json").read_text())
    except (OSError, ValueError):  # no checkpoint yet
        return {}
    return {r["round"]: r["model_sha256"] for r in doc["history"] if "round" in r}


def test_coordinator_killed_at_random_moments_finishes_and_never_redoes_a_round(
        tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    rounds = 25 * KILLS  # short rounds: enough of them that every kill lands before the end
    plan = plan_for(features, NAMES, rounds=rounds)
    sites = launch(tmp_path, mosquitto.port, NAMES, tables)
    cfg, plan_file, state = write_coordinator_files(tmp_path / "coord", plan, mosquitto.port)
    log = tmp_path / "coord.log"
    rng = random.Random(1234)
    seen: dict[int, str] = {}  # round -> model digest, the first time it was closed
    kills = 0
    # Kill moments are drawn by progress, not by the clock, so a fast host cannot finish the
    # federation before every kill has landed: each kill waits until a random round has
    # closed (one already closed: a kill during start-up), then a random 0-60 ms more
    # (inside the next round, its checkpoint write, or the start-up).
    for target in sorted(rng.sample(range(rounds - 10), KILLS)):
        proc = start_coordinator(cfg, plan_file, log)
        deadline = time.monotonic() + 120
        while len(_closed(state)) < target and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.06))
        if proc.poll() is not None:  # finished (or failed) before the kill
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        for rnd, digest in _closed(state).items():
            assert seen.setdefault(rnd, digest) == digest, f"round {rnd} changed"
    assert kills == KILLS, f"the federation finished after {kills} kills"
    last = start_coordinator(cfg, plan_file, log)
    assert last.wait(300) == 0, log.read_text()[-3000:]
    closed = _closed(state)
    assert sorted(closed) == list(range(1, rounds + 1))  # one model per round number
    assert all(seen.get(r, d) == d for r, d in closed.items())
    assert stop_all(sites) == [0, 0, 0]
    history = json.loads((state / "checkpoint.json").read_text())["history"]
    assert [r["round"] for r in history if "round" in r] == list(range(1, rounds + 1))
    assert log.read_text().count("resuming federation") >= KILLS // 2  # kills hit real work
    # killed right after the end, it stays finished: a new start does no round
    again = start_coordinator(cfg, plan_file, log)
    assert again.wait(60) == 0
    assert _closed(state) == closed


def test_a_broker_gone_for_ten_seconds_mid_round_loses_nothing(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    plan = plan_for(features, NAMES, rounds=4, deadline=120.0)
    sites = launch(tmp_path, mosquitto.port, NAMES, tables)
    seen: list[dict] = []

    def outage_after_two(record):
        seen.append(record)
        if record["round"] == 2:
            mosquitto.stop()  # while round 3's task is about to go out
            time.sleep(10.0)
            mosquitto.start()

    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=outage_after_two).start().join(timeout=240)
    assert [r["round"] for r in seen] == [1, 2, 3, 4]
    assert all(r["sites"] == sorted(NAMES) for r in seen)  # every site once a round
    assert final["sites"] == sorted(NAMES)
    assert stop_all(sites) == [0, 0, 0]


def test_one_site_of_four_never_answering_closes_rounds_at_the_deadline(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    plan = plan_for(features, [*NAMES, "west"], rounds=2, min_sites=3, deadline=3.0)
    sites = launch(tmp_path, mosquitto.port, NAMES, tables)  # west is never started
    seen: list[dict] = []
    started = time.monotonic()
    final = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord",
                              on_round=seen.append).start().join(timeout=120)
    assert [r["sites"] for r in seen] == [sorted(NAMES)] * 2
    assert all(r["seconds"] >= 3.0 for r in seen)  # each waited out its deadline
    assert final["sites"] == sorted(NAMES)
    assert time.monotonic() - started < 60
    assert stop_all(sites) == [0, 0, 0]

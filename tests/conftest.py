"""Shared fixtures: a real Mosquitto per test on a free loopback port with its own config."""

from __future__ import annotations

import shutil

import pytest

from agent.federation.broker import MOSQUITTO_HINT, LocalMosquitto, find_mosquitto


@pytest.fixture(autouse=True)
def _no_leftover_sites():
    yield
    from tests.fedharness import kill_leftovers

    kill_leftovers()


@pytest.fixture
def mosquitto():
    if find_mosquitto() is None:
        pytest.fail(MOSQUITTO_HINT)  # `make test` installs it; a missing broker is a failure
    broker = LocalMosquitto().start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.workdir, ignore_errors=True)

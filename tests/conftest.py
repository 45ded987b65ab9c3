"""Shared fixtures: a real Mosquitto per test on a free loopback port with its own config."""

from __future__ import annotations

import shutil

import pytest

import kernels
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


@pytest.fixture(params=["cpu", "cpu-parallel", "gpu"])
def backend(request, monkeypatch):
    """(name, namespace) of a fast kernel backend, compared by the kernel tests with the numpy
    reference; cpu-parallel forces the prange loops on small inputs; unavailable backends skip
    with the registry's reason."""
    name = request.param.split("-")[0]
    reason = kernels.available_backends()[name]
    if reason is not None:
        pytest.skip(reason)
    module = kernels.get_backend(name)
    if request.param == "cpu-parallel":
        monkeypatch.setattr(module, "PARALLEL_MIN_WORK", 0)
    return request.param, module

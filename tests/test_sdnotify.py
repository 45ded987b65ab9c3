"""Running under systemd (Type=notify): READY only once connected, watchdog pings while the
main loop lives, STATUS lines, STOPPING and a bounded, clean stop on SIGTERM. A real datagram
socket plays systemd's part; a real site process and a real Mosquitto play theirs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from agent.federation import topics
from agent.federation.broker import free_port
from agent.ops.sdnotify import Notifier
from tests.fedharness import breast_cancer_sites, write_site_config
from tests.test_federation import FED
from tests.test_lifecycle import read_retained


class FakeSystemd:
    """The notify socket systemd would listen on; collects every datagram."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = str(path)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float, until=None) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data))
            if until is not None and until(data):
                break
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


def test_notifier_speaks_the_protocol_and_pings_only_while_beaten(tmp_path):
    systemd = FakeSystemd(tmp_path / "notify")
    try:
        n = Notifier({"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "200000"})
        assert n.active and n.watchdog_s == 0.2
        n.extend_timeout(90)
        n.ready("idle")
        n.status("training, round 2")
        got = systemd.collect(0.3)
        assert got[:3] == ["EXTEND_TIMEOUT_USEC=90000000", "READY=1\nSTATUS=idle",
                           "STATUS=training, round 2"]
        n.start_watchdog()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:  # a live main loop
            n.beat()
            time.sleep(0.02)
        pings = [m for m in systemd.collect(0.05) if m == "WATCHDOG=1"]
        assert 3 <= len(pings) <= 9  # every 0.1 s
        before = len(systemd.messages)
        systemd.collect(0.6)  # the main loop hangs: pings stop within the interval
        late = [t for t, m in systemd.messages[before:] if m == "WATCHDOG=1"]
        assert all(t < end + 0.35 for t in late)
        n.stopping()
        assert systemd.collect(0.2)[-1] == "STOPPING=1\nSTATUS=stopping"
    finally:
        systemd.close()
    silent = Notifier({})  # not under systemd: nothing to send, nothing fails
    assert not silent.active
    silent.ready("x")
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000",
                     "WATCHDOG_PID": "1"}).watchdog_s is None  # meant for another process


@pytest.mark.integration
def test_a_site_under_systemd_is_ready_only_when_connected_and_stops_cleanly(tmp_path,
                                                                             mosquitto):
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    systemd = FakeSystemd(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "500000",
           "PYTHONUNBUFFERED": "1"}
    try:
        # No broker at that address: the agent waits for it, says so in STATUS= and asks for
        # more start-up time before each try, never claims to be ready, and stops on SIGTERM.
        port = free_port()
        cfg = write_site_config(tmp_path / "down", "north", FED, port, tables[0])
        down = subprocess.Popen([sys.executable, "-m", "agent", "site", "run", "--config",
                                 str(cfg)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            got = systemd.collect(30, until=lambda m: m.count("attempt 3 failed"))
            waiting = [m for m in got if m.startswith(
                f"STATUS=waiting for MQTT broker 127.0.0.1:{port} (attempt ")]
            assert len(waiting) == 3, got
            assert all("\nEXTEND_TIMEOUT_USEC=" in m for m in waiting)
            assert down.poll() is None
            down.send_signal(signal.SIGTERM)
            assert down.wait(timeout=10) == 0
        finally:
            if down.poll() is None:
                down.kill()
        assert "Traceback" not in down.stderr.read()
        assert not any(m.startswith("READY=1") for m in systemd.collect(0.2))
        systemd.messages.clear()

        cfg = write_site_config(tmp_path / "up", "north", FED, mosquitto.port, tables[0])
        proc = subprocess.Popen([sys.executable, "-m", "agent", "site", "run", "--config",
                                 str(cfg)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            got = systemd.collect(30, until=lambda m: m.startswith("READY=1"))
            assert got[-1].startswith("READY=1\nSTATUS=idle, connected to 127.0.0.1:")
            assert "EXTEND_TIMEOUT_USEC=120000000" in got
            status = read_retained(mosquitto.port, topics.site_status(FED, "north"),
                                   lambda d: d["state"] == "idle")
            assert status["state"] == "idle"  # the status was out before READY was said
            time.sleep(1.6)
            pings = [m for m in systemd.collect(0.1) if m == "WATCHDOG=1"]
            assert len(pings) >= 4  # every 0.25 s while idle
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - t < 5
        finally:
            if proc.poll() is None:
                proc.kill()
        assert any(m.startswith("STOPPING=1") for m in systemd.collect(0.3))
        offline = read_retained(mosquitto.port, topics.site_status(FED, "north"),
                                lambda d: d["state"] == "offline")
        assert offline["offline_reason"] == "stopped"
    finally:
        systemd.close()


@pytest.mark.integration
def test_sigterm_during_training_stops_within_seconds_and_goes_offline(tmp_path, mosquitto):
    """A long local training (a large MLP, many epochs) is interrupted at the next batch: the
    site exits 0 within a few seconds and leaves an explicit offline status."""
    import dataclasses

    from agent.config import ModelSpec, TrainingSpec
    from tests.fedharness import CoordinatorThread, start_site
    from tests.test_federation import plan_for

    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    plan = dataclasses.replace(
        plan_for(features, ["north"], rounds=1, deadline=120.0),
        model=ModelSpec("mlp", hidden=(512, 512)),
        training=TrainingSpec(local_epochs=500, batch_size=16, learning_rate=0.01,
                              optimizer="sgd", momentum=0.9))
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    proc = start_site(cfg, tmp_path / "north.log")
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord").start()
    try:
        read_retained(mosquitto.port, topics.site_status(FED, "north"),
                      lambda d: d["state"] == "training", timeout=60)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t < 10
        offline = read_retained(mosquitto.port, topics.site_status(FED, "north"),
                                lambda d: d["state"] == "offline")
        assert offline["offline_reason"] == "stopped"
        assert "stop requested during training" in (tmp_path / "north.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        coord.coordinator.stop_event.set()
        coord.thread.join(15)

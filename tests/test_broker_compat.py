"""Any broker works: the MQTT 5 -> 3.1.1 fallback against a real 3.1.1-only broker (amqtt),
and a federation forced onto MQTT 3.1.1 against Mosquitto."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import BrokerConfig
from agent.federation.broker import free_port
from agent.federation.transport import RECEIVE_MAXIMUM, Transport
from tests.fedharness import CoordinatorThread, breast_cancer_sites, start_site, stop_all
from tests.test_federation import FED, plan_for

pytestmark = pytest.mark.integration


@pytest.fixture
def amqtt_broker(tmp_path):
    exe = shutil.which("amqtt") or str(Path(sys.executable).with_name("amqtt"))
    port = free_port()
    cfg = tmp_path / "amqtt.yaml"
    cfg.write_text(f"""listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
""")
    proc = subprocess.Popen([exe, "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("amqtt did not start")
    yield port
    proc.terminate()
    proc.wait(10)


def test_auto_falls_back_to_mqtt_311_on_a_311_only_broker(amqtt_broker):
    t = Transport("fallback-probe", BrokerConfig(port=amqtt_broker, protocol="auto"),
                  subscriptions=["probe/#"])
    t.connect()
    try:
        assert t.protocol_used == "3.1.1"
        t.wait_published([t.publish("probe/1", b"hello")], 5)
        msg = t.receive(5)
        assert (msg.topic, msg.payload) == ("probe/1", b"hello")
    finally:
        t.close()


def test_auto_uses_mqtt_5_on_mosquitto(mosquitto):
    t = Transport("v5-probe", BrokerConfig(port=mosquitto.port, protocol="auto"))
    t.connect()
    try:
        assert t.protocol_used == "5"
    finally:
        t.close()


def test_federation_over_mqtt_311(tmp_path, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    procs = []
    for name, table in zip(names, tables[:2], strict=True):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f"""[site]
id = "{name}"
federation = "{FED}"
state_dir = "{tmp_path / name}"

[broker]
port = {mosquitto.port}
protocol = "3.1.1"

[data]
table = "{table}"
""")
        procs.append(start_site(cfg, tmp_path / f"{name}.log"))
    final = CoordinatorThread(plan_for(features, names, rounds=3), mosquitto.port,
                              tmp_path / "coord").start().join(timeout=120)
    assert stop_all(procs) == [0, 0]
    assert final["sites"] == names
    log = (tmp_path / "north.log").read_text()
    assert "connected to" in log
    connect_lines = (Path(mosquitto.workdir) / "mosquitto.log").read_text()
    assert "as fedsilo-bc-test-site-north (p2, c0" in connect_lines  # p2: 3.1.1, c0: persistent


def test_a_burst_waits_at_the_broker_not_in_the_receiver(mosquitto):
    """QoS 1 messages are acknowledged when the main loop takes them, and MQTT 5's Receive
    Maximum keeps the rest at the broker: a receiver that has taken nothing yet holds at most
    that many. (Mosquitto 2.0.11 stops honouring it once acknowledgements flow; see
    transport.py.) Taking them lets the rest in, none lost, in order."""
    rx = Transport("burst-rx", BrokerConfig(port=mosquitto.port), subscriptions=["burst/#"])
    tx = Transport("burst-tx", BrokerConfig(port=mosquitto.port))
    rx.connect()
    tx.connect()
    try:
        payload = bytes(100_000)
        tx.wait_published([tx.publish(f"burst/{i}", payload) for i in range(80)], 20)
        deadline = time.monotonic() + 10  # the receiver's main loop is "busy": nothing taken
        while rx.inbox.qsize() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # time for more to arrive, if the broker were to send them
        held = rx.inbox.qsize()
        assert 0 < held <= RECEIVE_MAXIMUM
        got = [rx.receive(5).topic for _ in range(80)]  # taking them lets the rest in
        assert got == [f"burst/{i}" for i in range(80)]
    finally:
        tx.close()
        rx.close()

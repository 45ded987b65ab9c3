"""The MQTT inbox is bounded for MQTT 3.1.1 too (no Receive Maximum there): with the inbox
full the network thread stops reading, so a flood waits in TCP buffers and at the broker,
and every QoS 1 message still arrives, in order."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from agent.config import BrokerConfig
from agent.federation.broker import LocalMosquitto, find_mosquitto
from agent.federation.transport import Transport

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
def roomy_mosquitto():
    """A broker that lets many unacknowledged messages fly to a client (as a hospital's may):
    only the receiver's own bound keeps its memory in check."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is needed")
    broker = LocalMosquitto(extra_config="max_inflight_messages 0\n").start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.workdir, ignore_errors=True)


def test_a_flood_of_1_mib_messages_to_a_slow_311_receiver_stays_bounded_and_complete(
        roomy_mosquitto):
    n, bound = 48, 6 * MIB
    conf = BrokerConfig(port=roomy_mosquitto.port, protocol="3.1.1")
    rx = Transport("flood-rx", conf, subscriptions=["flood/#"], inbox_max_bytes=bound)
    tx = Transport("flood-tx", conf)
    rx.connect()
    tx.connect()
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, rx.inbox_bytes)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        infos = [tx.publish(f"flood/{i}", bytes([i]) * MIB) for i in range(n)]
        time.sleep(2.0)  # the receiver's main loop is busy: nothing taken yet
        assert rx.read_pauses >= 1
        got = []
        for _ in range(n):
            msg = rx.receive(30)
            got.append((msg.topic, msg.payload[:1], len(msg.payload)))
            time.sleep(0.02)  # a slow main loop
        tx.wait_published(infos, 60)
        assert got == [(f"flood/{i}", bytes([i]), MIB) for i in range(n)]
        # At most one read's worth (paho reads a few packets per turn) above the bound.
        assert bound <= peak <= bound + 4 * MIB, peak
        assert rx.inbox_bytes == 0 and rx.connects == 1  # no reconnect, nothing redelivered
    finally:
        sampling.set()
        sampler.join()
        tx.close()
        rx.close()


def test_a_receiver_with_a_full_inbox_still_gets_its_own_publishes_acknowledged(
        roomy_mosquitto):
    """A PUBACK arrives behind the messages a full inbox leaves unread: while the main loop
    waits for its acknowledgements, reading goes on (else a coordinator sending a task while
    updates pour in would wait out its publish timeout)."""
    conf = BrokerConfig(port=roomy_mosquitto.port, protocol="3.1.1")
    rx = Transport("busy-rx", conf, subscriptions=["in/#"], inbox_max_bytes=2 * MIB)
    tx = Transport("busy-tx", conf)
    rx.connect()
    tx.connect()
    try:
        infos = [tx.publish(f"in/{i}", bytes(MIB)) for i in range(12)]
        deadline = time.monotonic() + 10
        while rx.read_pauses == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rx.inbox_full()
        tx.wait_published(infos, 30)  # more wait behind the unread ones
        time.sleep(0.5)
        rx.wait_published([rx.publish("out/0", b"x" * 100)], 10)
        got = [rx.receive(10).topic for _ in range(12)]
        assert got == [f"in/{i}" for i in range(12)]
    finally:
        tx.close()
        rx.close()

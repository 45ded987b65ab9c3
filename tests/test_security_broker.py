"""A real Mosquitto running the config `fedsilo broker-config` writes: who gets in, and what
each identity can see and send. Delivery is counted (Mosquitto grants every SUBSCRIBE and
withholds what the ACL does not allow), against a positive control that proves traffic flows."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import shutil
import ssl
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.config import BrokerConfig
from agent.config.site import TLSFiles
from agent.errors import ConfigError
from agent.federation.broker import LocalMosquitto, find_mosquitto, free_port
from agent.federation.transport import Transport, Will
from agent.security.brokerconf import Roster, load_roster, write_broker_config
from agent.security.pki import PKI
from tests.fedharness import (
    CoordinatorThread,
    breast_cancer_sites,
    start_site,
    stop_all,
    write_site_config,
)
from tests.test_federation import FED, plan_for

ROOT = f"fedsilo/v1/{FED}"


@pytest.fixture(scope="module")
def secure():
    if find_mosquitto() is None:
        pytest.fail("mosquitto missing: `make test` installs it")
    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-sec-"))
    os.chmod(tmp, 0o755)  # the broker's own user must get through to its directory
    pki = PKI.init(tmp / "pki", FED)
    for site in ("north", "south"):
        pki.issue("site", site)
    pki.issue("coordinator", "coordinator")
    pki.issue("monitor", "monitor")
    pki.issue("site", "west")
    pki.revoke("west")
    then = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    pki.issue("site", "east", not_before=then, days=365)  # expired a month ago
    other = PKI.init(tmp / "other-ca", FED)
    other.issue("site", "north")
    port = free_port()
    conf = write_broker_config(pki, Roster(FED, ("north", "south")), port, tmp / "broker",
                               bind="127.0.0.1")
    broker = LocalMosquitto(workdir=tmp / "broker", port=port, config=conf).start()
    try:
        yield pki, port, tmp
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def can_connect(port: int, ca: Path, cert: Path | None, key: Path | None,
                client_id: str = "probe") -> bool:
    """A bare paho client: True only if the broker sent a successful CONNACK."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
              keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)
    ok = []
    c.on_connect = lambda *a: ok.append(not a[3].is_failure)
    try:
        c.connect("127.0.0.1", port, 10)
    except OSError:
        return False  # the TLS handshake itself was refused
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not ok:
        if c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    c.disconnect()
    return ok == [True]


def client(pki: PKI, port: int, identity: str, subscriptions=(), client_id=None) -> Transport:
    t = Transport(client_id or f"fedsilo-{FED}-{identity}",
                  BrokerConfig(port=port, tls=TLSFiles(ca=pki.dir / "ca.crt",
                                                       cert=pki.dir / f"{identity}.crt",
                                                       key=pki.dir / f"{identity}.key")),
                  subscriptions=list(subscriptions))
    t.connect()
    return t


def drain(t: Transport, seconds: float, expect: int | None = None) -> list[str]:
    """Topics delivered within `seconds` (sooner once `expect` of them came)."""
    topics, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and (expect is None or len(topics) < expect):
        try:
            topics.append(t.receive(left).topic)
        except Exception:  # queue.Empty
            break
    return topics


def test_only_certificates_of_the_federation_ca_that_are_valid_get_in(secure):
    pki, port, tmp = secure
    ca = pki.dir / "ca.crt"
    assert can_connect(port, ca, pki.dir / "north.crt", pki.dir / "north.key")
    assert not can_connect(port, ca, None, None)  # no client certificate
    other = tmp / "other-ca"
    assert not can_connect(port, ca, other / "north.crt", other / "north.key")  # another CA
    assert not can_connect(port, ca, pki.dir / "east.crt", pki.dir / "east.key")  # expired
    assert not can_connect(port, ca, pki.dir / "west.crt", pki.dir / "west.key")  # revoked


def test_a_site_sees_and_sends_only_what_its_acl_allows(secure):
    pki, port, _ = secure
    coord = client(pki, port, "coordinator", [f"{ROOT}/site/+/#", f"{ROOT}/coordinator/#"])
    monitor = client(pki, port, "monitor", [f"{ROOT}/#"])
    spy = client(pki, port, "north", [f"{ROOT}/site/south/#", "#"])
    south = client(pki, port, "south", [f"{ROOT}/coordinator/round/#"])
    try:
        # south uploads: the coordinator gets it, north (subscribed to south and to #) does not
        south.wait_published([south.publish(f"{ROOT}/site/south/update/1/manifest", b"m"),
                              south.publish(f"{ROOT}/site/south/status", b"s")], 5)
        assert sorted(drain(coord, 5, expect=2)) == [f"{ROOT}/site/south/status",
                                                     f"{ROOT}/site/south/update/1/manifest"]
        assert drain(spy, 1.0) == []
        # status only (read-only identity); then nothing more
        assert drain(monitor, 5, expect=1) + drain(monitor, 0.5) == [f"{ROOT}/site/south/status"]
        # north forging south's and the coordinator's topics: nobody gets it; its own: fine
        for topic in (f"{ROOT}/site/south/update/1/manifest", f"{ROOT}/coordinator/round/1/"
                      "manifest", f"{ROOT}/coordinator/status"):
            spy.wait_published([spy.publish(topic, b"forged")], 5)
        spy.wait_published([spy.publish(f"{ROOT}/site/north/status", b"own")], 5)
        # MQTT 5 says so in the PUBACK: counted for the status, the topic named
        assert spy.protocol_used == "5" and spy.publishes_refused == 3
        assert spy.last_refusal == f"Not authorized on {ROOT}/coordinator/status"
        assert drain(coord, 5, expect=1) + drain(coord, 1.0) == [f"{ROOT}/site/north/status"]
        assert drain(south, 0.5) == []
        assert drain(monitor, 5, expect=1) + drain(monitor, 0.5) == [f"{ROOT}/site/north/status"]
        # the monitor cannot write anything
        monitor.wait_published([monitor.publish(f"{ROOT}/coordinator/round/2/manifest", b"x"),
                                monitor.publish(f"{ROOT}/site/north/status", b"x")], 5)
        assert monitor.publishes_refused == 2 and south.publishes_refused == 0
        assert drain(south, 1.0) == [] and drain(coord, 0.5) == []
    finally:
        for t in (coord, monitor, spy, south):
            t.close()


def test_a_site_using_another_sites_client_id_does_not_push_it_off(secure):
    pki, port, _ = secure
    coord = client(pki, port, "coordinator", [f"{ROOT}/site/+/#"])
    south = client(pki, port, "south")
    impostor = client(pki, port, "north", client_id=f"fedsilo-{FED}-south")
    try:
        time.sleep(0.5)
        south.wait_published([south.publish(f"{ROOT}/site/south/status", b"still here")], 5)
        assert drain(coord, 5, expect=1) == [f"{ROOT}/site/south/status"]
        assert south.connects == 1  # never disconnected, so never reconnected
    finally:
        for t in (coord, south, impostor):
            t.close()


def test_broker_config_files_and_refusals(secure, tmp_path):
    pki, port, tmp = secure
    conf = (tmp / "broker" / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 "max_packet_size 2000000"):
        assert line in conf
    assert oct((tmp / "broker" / "broker.key").stat().st_mode & 0o777) == "0o600"
    roster = tmp_path / "roster.toml"
    roster.write_text(f'federation = "{FED}"\nsites = ["north", "coordinator"]\n')
    with pytest.raises(ConfigError, match="sites"):
        load_roster(roster)
    roster.write_text('federation = "other"\nsites = ["north"]\n')
    with pytest.raises(ConfigError, match=f"CA is for '{FED}'"):
        write_broker_config(pki, load_roster(roster), port, tmp_path / "out")


def test_a_whole_federation_over_mutual_tls(secure, tmp_path):
    """Sites and coordinator with their own certificates, through the generated broker and
    ACL: every round completes and the status carries the certificates' days left."""
    pki, port, _ = secure
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    # The ACL lets an enrolled site publish anything under its own update/#: south leaves a
    # manifest retained under round '²' (int('²') used to end the coordinator; issue 17.1).
    hostile = [f"{ROOT}/site/south/update/{x}/manifest" for x in ("²", "１", "9" * 20)]
    south = client(pki, port, "south", client_id=f"fedsilo-{FED}-site-south")
    south.wait_published([south.publish(t, b"FSLO", retain=True) for t in hostile], 10)
    south.close()
    procs = []
    for name, table in zip(names, tables[:2], strict=True):
        tls = {"ca": str(pki.dir / "ca.crt"), "cert": str(pki.dir / f"{name}.crt"),
               "key": str(pki.dir / f"{name}.key")}
        cfg = write_site_config(tmp_path / "sites", name, FED, port, table, tls=tls)
        procs.append(start_site(cfg, tmp_path / f"{name}.log"))
    statuses = client(pki, port, "monitor", [f"{ROOT}/+/+/status", f"{ROOT}/coordinator/status"])
    try:
        coord = CoordinatorThread(
            plan_for(features, names, rounds=3), port, tmp_path / "coord",
            tls=TLSFiles(ca=pki.dir / "ca.crt", cert=pki.dir / "coordinator.crt",
                         key=pki.dir / "coordinator.key")).start()
        final = coord.join(timeout=120)
        assert stop_all(procs) == [0, 0]
        assert final["sites"] == names
        assert coord.coordinator.peer.rejected["bad_topic"] >= len(hostile)  # per subscription
        seen, every = {}, []
        while True:
            try:
                msg = statuses.receive(3.0)
            except Exception:  # queue.Empty: nothing more
                break
            # (the monitor's persistent session also keeps an earlier test's subscription to
            # everything, and what that test sent)
            if msg.topic.endswith("/status") and msg.payload.startswith(b"{"):
                doc = json.loads(msg.payload)
                seen[doc["id"]] = doc
                every.append(doc)
        assert set(seen) >= {"north", "south", "coordinator"}
        for i in ("north", "coordinator"):
            assert 364 < seen[i].get("cert_days_left", 0) <= 365, (i, every)
    finally:
        statuses.close()
        south = client(pki, port, "south", client_id=f"fedsilo-{FED}-site-south")
        south.wait_published([south.publish(t, b"", retain=True) for t in hostile], 10)
        south.close()


def test_two_way_traffic_over_tls_keeps_one_connection_and_a_clean_stop_is_not_lost(secure):
    """The main thread publishes and acknowledges while the network thread reads: one TLS
    socket, so only one thread may touch it. And a stop with messages still arriving must
    reach the broker as a clean DISCONNECT: the retained status stays the explicit one, never
    the will. (Both failed under load before: "connection lost", a will on a clean stop.)"""
    pki, port, _ = secure
    status = f"{ROOT}/site/north/status"
    # QoS 0, from paho's own loop thread: a flow the broker never holds back for
    # acknowledgements, so messages are always on their way to north when it closes
    coord = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood",
                        protocol=mqtt.MQTTv5)
    coord.tls_set(ca_certs=str(pki.dir / "ca.crt"), certfile=str(pki.dir / "coordinator.crt"),
                  keyfile=str(pki.dir / "coordinator.key"), cert_reqs=ssl.CERT_REQUIRED)
    burst = threading.Event()
    coord.connect("127.0.0.1", port, 30)
    coord.loop_start()
    watcher = client(pki, port, "monitor", [status])
    stop = threading.Event()

    def flood() -> None:
        """A steady few MB/s that a loaded host keeps up with (else north's PUBACKs wait behind
        an ever longer backlog at the broker), and a burst of ~2.5 MB as north starts to close:
        still arriving while it closes its socket."""
        n = 0
        while not stop.is_set():
            count = 4
            if burst.wait(0.001):
                burst.clear()
                count = 5000
            for _ in range(count):
                coord.publish(f"{ROOT}/coordinator/round/9/chunk/{n % 50}", os.urandom(500),
                              qos=0)
                n += 1

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    north = None
    try:
        for attempt in range(3):
            north = Transport(f"fedsilo-{FED}-north", BrokerConfig(port=port, tls=TLSFiles(
                ca=pki.dir / "ca.crt", cert=pki.dir / "north.crt", key=pki.dir / "north.key")),
                subscriptions=[f"{ROOT}/coordinator/round/#"],
                will=Will(status, b"will: connection lost"))
            north.connect()
            sent, received, deadline = [], 0, time.monotonic() + 1.5
            while time.monotonic() < deadline:
                sent.append(north.publish(f"{ROOT}/site/north/update/9/chunk/{len(sent)}",
                                          os.urandom(1000)))
                try:
                    north.receive(0.0)
                    received += 1
                except queue.Empty:
                    pass
                if len(sent) % 5 == 0:  # a few MB/s: acknowledged in time on a loaded host
                    time.sleep(0.001)
            north.wait_published(sent, 20)
            assert received > 0 and north.connects == 1
            burst.set()
            north.close(final=(status, f"stopped {attempt}".encode()))
            last, end = None, time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    msg = watcher.receive(end - time.monotonic())
                except queue.Empty:
                    break
                if msg.topic == status:
                    last = msg.payload
                    end = min(end, time.monotonic() + 1.0)  # a will would follow at once
            assert last == f"stopped {attempt}".encode()
    finally:
        stop.set()
        if north is not None and north.connected:
            north.close()
        flooder.join(5)
        coord.disconnect()
        coord.loop_stop()
        watcher.close()

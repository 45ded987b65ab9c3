"""The monitoring snippets in README.md and docs/monitoring.md, run as written against real
parts: the real `mosquitto_sub` with the README's topic filters, and Debian's real
`zabbix_agent2` with the documented config file and item key against the broker
`fedsilo broker-config --monitor-listener` configures. The commands are parsed out of the docs,
so doc and test cannot drift.

`mqtt.get` is an active check (not available in `zabbix_agent2 -t`), so the agent talks to a
minimal stand-in for the Zabbix server: the active-checks protocol (ZBXD header + JSON), which
hands the agent its items and records what it sends back, as the server would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.errors import ConfigError
from agent.federation.broker import LocalMosquitto, find_mosquitto, free_port
from agent.ops.status import State, encode_status, offline_status, status_document
from agent.security.brokerconf import (
    Roster,
    mosquitto_password_line,
    parse_monitor_listener,
    write_broker_config,
)
from agent.security.pki import PKI

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MONITORING = (REPO / "docs" / "monitoring.md").read_text()
FED = "stroke-eu"  # the federation the docs' examples use, so their topics run unchanged
SITE_STATUS = f"fedsilo/v1/{FED}/site/north/status"
COORD_STATUS = f"fedsilo/v1/{FED}/coordinator/status"


# --- the docs -------------------------------------------------------------------------------

def readme_mosquitto_sub() -> list[str]:
    """The README's `mosquitto_sub …` one-liner, as argv."""
    commands = re.findall(r"`(mosquitto_sub [^`]+)`", README)
    assert len(commands) == 1, f"expected one mosquitto_sub command in README.md: {commands}"
    return shlex.split(commands[0])


def topic_filters(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-t"]


def ini_block(marker: str) -> str:
    """The ```ini block of docs/monitoring.md whose first line contains `marker`."""
    blocks = [b for b in re.findall(r"```ini\n(.*?)```", MONITORING, re.S)
              if marker in b.splitlines()[0]]
    assert len(blocks) == 1, f"expected one ini block marked {marker!r} in docs/monitoring.md"
    return blocks[0]


def zabbix_item_key() -> str:
    keys = re.findall(r"^Key:\s+(mqtt\.get\[.*\])\s*$", MONITORING, re.M)
    assert len(keys) == 1, f"expected one Key: line in docs/monitoring.md: {keys}"
    return keys[0]


DEBIAN_AGENT = ini_block("6.0.14")
NEWER_AGENT = ini_block(">= 6.0.19")


def test_the_readme_filters_are_the_status_topics():
    assert topic_filters(readme_mosquitto_sub()) == ["fedsilo/v1/+/site/+/status",
                                                     "fedsilo/v1/+/coordinator/status"]


# --- 16.3: the README's mosquitto_sub shows every status -----------------------------------

@pytest.mark.integration
def test_the_readme_mosquitto_sub_shows_site_and_coordinator_status(mosquitto):
    mosquitto_sub = shutil.which("mosquitto_sub")
    if mosquitto_sub is None:
        pytest.fail("mosquitto_sub missing: `make test` installs mosquitto-clients")
    site = encode_status(status_document(role="site", identity="north", federation=FED,
                                         state=State.IDLE, round=2))
    coord = encode_status(status_document(role="coordinator", identity="coordinator",
                                          federation=FED, state=State.COLLECTING, round=2))
    publish_retained(mosquitto.port, {SITE_STATUS: site, COORD_STATUS: coord,
                                      f"fedsilo/v1/{FED}/coordinator/control": b"{}"})
    argv = readme_mosquitto_sub()
    argv = [("127.0.0.1" if a == "BROKER" else a) for a in argv[1:]]
    out = subprocess.run([mosquitto_sub, *argv, "-p", str(mosquitto.port), "-W", "2"],
                         capture_output=True, text=True, timeout=20).stdout
    shown = dict(line.split(" ", 1) for line in out.splitlines())
    assert shown == {SITE_STATUS: site.decode(), COORD_STATUS: coord.decode()}, out


# --- the broker's plaintext monitor listener -----------------------------------------------

@pytest.fixture(scope="module")
def monitored():
    """A broker from `fedsilo broker-config` with the monitor listener on, and the retained
    status of site north and of the coordinator, published over TLS by those identities."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto missing: `make test` installs it")
    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-mon-"))
    os.chmod(tmp, 0o755)  # Mosquitto started as root reads its files as user mosquitto
    pki = PKI.init(tmp / "pki", FED)
    for role, name in (("site", "north"), ("coordinator", "coordinator")):
        pki.issue(role, name)
    port, mport = free_port(), free_port()
    conf = write_broker_config(pki, Roster(FED, ("north",)), port, tmp / "broker",
                               bind="127.0.0.1", monitor_listener=("127.0.0.1", mport))
    broker = LocalMosquitto(workdir=tmp / "broker", port=port, config=conf).start()
    docs = {SITE_STATUS: encode_status(status_document(
                role="site", identity="north", federation=FED, state=State.TRAINING, round=3,
                extra={"disk_free_gib": 12.5, "cert_days_left": 300.0})),
            COORD_STATUS: offline_status(role="coordinator", identity="coordinator",
                                         federation=FED, reason="stopped")}
    try:
        publish_retained(port, {SITE_STATUS: docs[SITE_STATUS]}, tls=(pki, "north"))
        publish_retained(port, {COORD_STATUS: docs[COORD_STATUS],
                                f"fedsilo/v1/{FED}/coordinator/control": b"{}"},
                         tls=(pki, "coordinator"))
        password = (tmp / "broker" / "monitor.password").read_text().strip()
        yield {"pki": pki, "port": port, "mport": mport, "password": password, "docs": docs,
               "dir": tmp / "broker"}
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_monitor_listener_reads_status_only_and_publishes_nothing(monitored):
    m = monitored
    seen = retained(m["mport"], "monitor", m["password"], f"fedsilo/v1/{FED}/#")
    assert seen == m["docs"]  # both statuses; the coordinator's control topic is withheld
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
    c.username_pw_set("monitor", m["password"])
    c.connect("127.0.0.1", m["mport"])
    c.loop_start()
    c.publish(SITE_STATUS, b'{"state": "forged"}', qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    assert retained(m["mport"], "monitor", m["password"], SITE_STATUS) == {
        SITE_STATUS: m["docs"][SITE_STATUS]}


def test_monitor_listener_admits_only_the_monitor_user(monitored):
    m = monitored
    assert connack(m["mport"], "monitor", m["password"]) == "Success"
    assert connack(m["mport"], "monitor", "wrong") != "Success"
    assert connack(m["mport"], "north", m["password"]) != "Success"
    assert connack(m["mport"], None, None) != "Success"


def test_monitor_listener_cannot_push_a_site_off(monitored):
    """Client ids are forced to the username: a monitor asking for site north's client id
    does not take over north's session on the TLS listener."""
    m = monitored
    north, dropped = tls_client(m["pki"], "north", m["port"])
    try:
        assert connack(m["mport"], "monitor", m["password"], client_id="north") == "Success"
        time.sleep(0.5)
        assert not dropped.is_set(), "the monitor listener took over site north's session"
    finally:
        north.loop_stop()
        north.disconnect()


def test_monitor_listener_is_off_by_default_and_refuses_wildcards(tmp_path):
    pki = PKI.init(tmp_path / "pki", FED)
    conf = write_broker_config(pki, Roster(FED, ("north",)), 8883, tmp_path / "plain")
    text = conf.read_text()
    assert text.count("\nlistener ") == 1 and "password_file" not in text
    assert not (tmp_path / "plain" / "passwd").exists()
    assert parse_monitor_listener("127.0.0.1:1884", 8883) == ("127.0.0.1", 1884)
    assert parse_monitor_listener("[::1]:1884", 8883) == ("::1", 1884)
    for bad in ("0.0.0.0:1884", ":1884", "[::]:1884", "127.0.0.1:8883", "127.0.0.1",
                "127.0.0.1:99999"):
        with pytest.raises(ConfigError, match="--monitor-listener"):
            parse_monitor_listener(bad, 8883)
    # the command line: exit status 2 and one line
    roster = tmp_path / "roster.toml"
    roster.write_text(f'federation = "{FED}"\nsites = ["north"]\n')
    run = subprocess.run([sys.executable, "-m", "agent", "broker-config", "--pki",
                          str(tmp_path / "pki"), "--roster", str(roster), "--out",
                          str(tmp_path / "cli"), "--monitor-listener", "0.0.0.0:1884"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "all interfaces" in run.stderr


def test_regenerating_keeps_the_monitor_password(monitored, tmp_path):
    out = monitored["dir"]
    before = (out / "monitor.password").read_text()
    assert (out / "monitor.password").stat().st_mode & 0o777 == 0o600
    assert (out / "passwd").stat().st_mode & 0o777 == 0o600
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("data", "*.log"))
    write_broker_config(monitored["pki"], Roster(FED, ("north",)), monitored["port"], copy,
                        monitor_listener=("127.0.0.1", monitored["mport"]))
    assert (copy / "monitor.password").read_text() == before
    user, hashed = (copy / "passwd").read_text().strip().split(":", 1)
    assert user == "monitor" and hashed.startswith("$7$101$")
    assert mosquitto_password_line("monitor", "x") != mosquitto_password_line("monitor", "x")


# --- 16.4: Debian 12's zabbix_agent2 with the documented snippet ---------------------------

def zabbix_agent2() -> str:
    found = shutil.which("zabbix_agent2") or next(
        (p for p in ("/usr/sbin/zabbix_agent2",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("zabbix_agent2 missing: `make test` installs zabbix-agent2 "
                    "(packaging/ensure-system-deps.sh)")
    return found


def agent_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10).stdout
    return tuple(int(x) for x in re.search(r"\(Zabbix\) (\d+)\.(\d+)\.(\d+)", out).groups())


def agent_config(workdir: Path, server_port: int, dropin: str) -> Path:
    """The agent's own main config (temp files, active checks only: no `Server`, so no
    passive listener) including the documented drop-in as an operator would put it in
    zabbix_agent2.d/."""
    (workdir / "fedsilo.conf").write_text(dropin)
    conf = workdir / "zabbix_agent2.conf"
    conf.write_text("\n".join([
        "LogType=console", f"ServerActive=127.0.0.1:{server_port}", "Hostname=fedsilo-test",
        f"ControlSocket={workdir}/agent.sock", f"PidFile={workdir}/agent.pid",
        "BufferSend=1", f"Include={workdir}/fedsilo.conf", ""]))
    return conf


@pytest.mark.integration
def test_debian_zabbix_agent2_reads_status_with_the_documented_snippet(monitored):
    binary = zabbix_agent2()
    m = monitored
    # what the Zabbix server does before it hands the agent its items: resolve the macro;
    # our broker listens on its own ports instead of the documented 8883/1884
    key = zabbix_item_key().replace("{$FEDSILO.MONITOR.PASSWORD}", m["password"])
    assert "127.0.0.1:1884" in key and SITE_STATUS in key, key
    site_key = key.replace("127.0.0.1:1884", f"127.0.0.1:{m['mport']}")
    items = {1: site_key,
             2: site_key.replace("site/north/status", "coordinator/status"),
             3: f'mqtt.get["tls://127.0.0.1:{m["port"]}","{SITE_STATUS}"]'}  # what 6.0.14 lacks
    work = Path(tempfile.mkdtemp(prefix="fedsilo-zbx-"))
    server = ActiveChecksServer(items)
    agent = subprocess.Popen([binary, "-c", str(agent_config(work, server.port, DEBIAN_AGENT))],
                             stdout=(work / "agent.log").open("w"), stderr=subprocess.STDOUT)
    try:
        got = server.wait_for(set(items), timeout_s=20, alive=lambda: agent.poll() is None)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        server.close()
        log = (work / "agent.log").read_text()
        shutil.rmtree(work, ignore_errors=True)
    refused = [line for line in log.splitlines() if "ERROR:" in line or "unknown parameter" in line]
    assert not refused, "\n".join(refused)
    assert set(got) == set(items), f"agent sent {got}; its log:\n{log[-2000:]}"
    assert got[1]["state"] == 0 and json.loads(got[1]["value"]) == json.loads(
        m["docs"][SITE_STATUS])
    assert got[2]["state"] == 0 and json.loads(got[2]["value"]) == json.loads(
        m["docs"][COORD_STATUS])
    if agent_version(binary) < (6, 0, 19):  # what docs/monitoring.md says 6.0.14 cannot do
        assert got[3]["state"] == 1, got[3]
        assert "x509: certificate signed by unknown authority" in got[3]["value"], got[3]


def test_debian_zabbix_agent2_accepts_the_debian_snippet_and_refuses_the_newer_one(tmp_path):
    binary = zabbix_agent2()

    def test_mode(dropin: str) -> subprocess.CompletedProcess:
        work = Path(tempfile.mkdtemp(prefix="fedsilo-zbx-"))
        try:
            return subprocess.run([binary, "-c", str(agent_config(work, free_port(), dropin)),
                                   "-t", "agent.ping"], capture_output=True, text=True,
                                  timeout=20)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    ok = test_mode(DEBIAN_AGENT)
    assert ok.returncode == 0 and "[s|1]" in ok.stdout, ok.stdout + ok.stderr
    version = agent_version(binary)
    if version >= (6, 0, 19):
        pytest.skip(f"zabbix_agent2 {version} takes TLS sessions; docs/monitoring.md's "
                    "6.0.14 limits do not apply to it")
    refused = test_mode(NEWER_AGENT)
    assert refused.returncode != 0
    assert "Plugins.MQTT.Sessions" in refused.stdout + refused.stderr
    assert "unknown parameter" in refused.stdout + refused.stderr


# --- helpers: MQTT clients and the Zabbix server's side of active checks -------------------

def publish_retained(port: int, messages: dict[str, bytes], tls: tuple[PKI, str] | None = None
                     ) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    if tls is not None:
        pki, name = tls
        c.tls_set(ca_certs=str(pki.dir / "ca.crt"), certfile=str(pki.dir / f"{name}.crt"),
                  keyfile=str(pki.dir / f"{name}.key"), cert_reqs=ssl.CERT_REQUIRED)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for info in [c.publish(t, p, qos=1, retain=True) for t, p in messages.items()]:
            info.wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def tls_client(pki: PKI, name: str, port: int) -> tuple[mqtt.Client, threading.Event]:
    dropped, up = threading.Event(), threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    c.tls_set(ca_certs=str(pki.dir / "ca.crt"), certfile=str(pki.dir / f"{name}.crt"),
              keyfile=str(pki.dir / f"{name}.key"), cert_reqs=ssl.CERT_REQUIRED)
    c.on_connect = lambda *a: up.set()
    c.on_disconnect = lambda *a: dropped.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert up.wait(10), f"{name} did not connect over TLS"
    return c, dropped


def connack(port: int, user: str | None, password: str | None,
            client_id: str = "probe") -> str:
    """The broker's CONNACK reason for these credentials on the plaintext listener."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if user is not None:
        c.username_pw_set(user, password)
    reason: list[str] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: reason.append(str(rc))
    c.connect("127.0.0.1", port)
    deadline = time.monotonic() + 5
    while not reason and time.monotonic() < deadline and c.loop(0.1) == mqtt.MQTT_ERR_SUCCESS:
        pass
    c.disconnect()
    return reason[0] if reason else "no CONNACK"


def retained(port: int, user: str, password: str, topic: str) -> dict[str, bytes]:
    """What the broker delivers to a fresh subscriber within a second."""
    seen: dict[str, bytes] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
    c.username_pw_set(user, password)
    c.on_message = lambda _c, _u, msg: seen.__setitem__(msg.topic, msg.payload)
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(1.0)
    c.loop_stop()
    c.disconnect()
    return seen


class ActiveChecksServer:
    """The Zabbix server's half of active checks: answers "active checks" with `items`
    (itemid -> key) and keeps the last value per item from "agent data"."""

    def __init__(self, items: dict[int, str]) -> None:
        self.items = items
        self.values: dict[int, dict] = {}
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                request = zbx_recv(conn)
                if request.get("request") == "active checks":
                    zbx_send(conn, {"response": "success", "data": [
                        {"key": k, "itemid": i, "delay": "1s", "lastlogsize": 0, "mtime": 0}
                        for i, k in self.items.items()]})
                    continue
                for entry in request.get("data", []):
                    self.values[entry["itemid"]] = {"value": entry.get("value"),
                                                    "state": entry.get("state", 0)}
                zbx_send(conn, {"response": "success", "info": "processed"})

    def wait_for(self, itemids: set[int], timeout_s: float, alive) -> dict[int, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive() and not itemids <= set(self.values):
            time.sleep(0.1)
        return dict(self.values)

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=5)
        self.sock.close()


def zbx_recv(conn: socket.socket) -> dict:
    """One Zabbix protocol message: "ZBXD", flags, data length, reserved, JSON."""
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("agent closed the connection mid-message")
            buf += chunk
        return buf

    header = exactly(13)
    assert header[:4] == b"ZBXD", header
    length, _reserved = struct.unpack("<II", header[5:13])
    body = exactly(length)
    return json.loads(zlib.decompress(body) if header[4] & 0x02 else body)


def zbx_send(conn: socket.socket, doc: dict) -> None:
    body = json.dumps(doc).encode()
    conn.sendall(b"ZBXD\x01" + struct.pack("<II", len(body), 0) + body)

"""Hospital networks: sites that may only go out through the hospital's HTTP proxy reach the
broker as MQTT over secure WebSockets through a real CONNECT proxy (tinyproxy, with basic
auth), mutual TLS unchanged; a proxy that refuses is named in the site's log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tomli_w import dumps

from agent.config.site import TLSFiles, proxy_from_env
from agent.federation.broker import LocalMosquitto, find_mosquitto, free_port, wait_listening
from agent.security.brokerconf import Roster, write_broker_config
from agent.security.pki import PKI
from tests.fedharness import CoordinatorThread, breast_cancer_sites, start_site, stop_all
from tests.test_federation import FED, plan_for

pytestmark = pytest.mark.integration
NAMES = ["north", "south"]
IDLE = "east"  # in the roster, never run: a clean MQTT session for doctor's read check
NEEDS_TINYPROXY = pytest.mark.skipif(shutil.which("tinyproxy") is None,
                                     reason="tinyproxy not found (make system-deps installs it)")


@pytest.fixture(scope="module")
def network():
    """The generated broker with its TLS and wss listeners, and tinyproxy in front of the wss
    one only (ConnectPort), with basic auth: (pki, tls port, wss port, proxy port, dir)."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto missing: `make test` installs it")
    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-net-"))
    os.chmod(tmp, 0o755)  # the broker's own user must get through to its directory
    pki = PKI.init(tmp / "pki", FED)
    for name in (*NAMES, IDLE, "coordinator"):
        pki.issue("site" if name != "coordinator" else "coordinator", name)
    tls_port, wss_port, proxy_port = free_port(), free_port(), free_port()
    conf = write_broker_config(pki, Roster(FED, (*NAMES, IDLE)), tls_port, tmp / "broker",
                               bind="127.0.0.1", websockets_port=wss_port)
    broker = LocalMosquitto(workdir=tmp / "broker", port=tls_port, config=conf).start()
    (tmp / "tinyproxy.conf").write_text(
        f"Port {proxy_port}\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\n"
        f"ConnectPort {wss_port}\nBasicAuth hospital s3cret\nLogLevel Connect\n")
    proxy = subprocess.Popen(["tinyproxy", "-d", "-c", str(tmp / "tinyproxy.conf")],
                             stdout=(tmp / "tinyproxy.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_listening(proxy_port, proxy, "tinyproxy", 10)
        yield pki, tls_port, wss_port, proxy_port, tmp
    finally:
        proxy.kill()
        proxy.wait(10)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _tls(pki: PKI, name: str) -> TLSFiles:
    return TLSFiles(ca=pki.dir / "ca.crt", cert=pki.dir / f"{name}.crt",
                    key=pki.dir / f"{name}.key")


def _site_config(tmp: Path, pki: PKI, name: str, wss_port: int, proxy_port: int, table: Path,
                 credentials: str) -> Path:
    auth = tmp / f"{name}-proxy.auth"
    auth.write_text(credentials + "\n")
    auth.chmod(0o600)
    cfg = tmp / f"{name}.toml"
    cfg.write_text(dumps({
        "site": {"id": name, "federation": FED, "state_dir": str(tmp / name)},
        "broker": {"host": "127.0.0.1", "port": wss_port, "transport": "websockets",
                   "tls": {k: str(v) for k, v in vars(_tls(pki, name)).items()},
                   "proxy": {"host": "127.0.0.1", "port": proxy_port, "auth_file": str(auth)}},
        "data": {"table": str(table), "holdout_fraction": 0.2},
    }))
    return cfg


@NEEDS_TINYPROXY
def test_a_federation_over_wss_through_the_hospital_proxy(network, tmp_path):
    pki, tls_port, wss_port, proxy_port, net = network
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    procs = [start_site(_site_config(tmp_path, pki, name, wss_port, proxy_port, table,
                                     "hospital:s3cret"), tmp_path / f"{name}.log")
             for name, table in zip(NAMES, tables[:2], strict=True)]
    coord = CoordinatorThread(  # the coordinator, in its own network, talks TLS directly
        plan_for(features, NAMES, rounds=2), tls_port, tmp_path / "coord",
        tls=_tls(pki, "coordinator")).start()
    final = coord.join(timeout=120)
    assert stop_all(procs) == [0, 0]
    assert final["sites"] == NAMES
    proxy_log = (net / "tinyproxy.log").read_text()
    assert proxy_log.count(f"127.0.0.1:{wss_port}") >= len(NAMES)  # both tunnelled through it
    for name in NAMES:
        log = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in log and f"connected to 127.0.0.1:{wss_port}" in log
        status = coord.coordinator.site_status[name]  # what IT sees in the retained status
        assert status["broker_url"] == f"wss://127.0.0.1:{wss_port}/mqtt"
        assert status["broker_proxy"] == f"127.0.0.1:{proxy_port}"
        assert status["reconnects"] == 0
        assert 0 < status["last_rtt_ms"] < 5000  # status publishes, timed to their PUBACK


@NEEDS_TINYPROXY
def test_a_proxy_that_refuses_is_named(network, tmp_path):
    pki, _tls, wss_port, proxy_port, _net = network
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    log = tmp_path / "north.log"
    proc = start_site(_site_config(tmp_path, pki, "north", wss_port, proxy_port, tables[0],
                                   "hospital:wrong"), log)
    try:
        deadline = time.monotonic() + 30
        # tinyproxy answers a bad BasicAuth with 401 (a proxy without credentials: 407)
        needle = re.compile(
            rf"proxy 127\.0\.0\.1:{proxy_port} did not open a tunnel to 127\.0\.0\.1:"
            rf"{wss_port} \(wss\): 40[17]: [A-Za-z ]+ \(the proxy wants other credentials: "
            rf"check \[broker\.proxy\] auth_file\)")
        while not needle.search(log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert needle.search(log.read_text()), log.read_text()[-2000:]
        assert proc.poll() is None  # it keeps trying, as for any unreachable broker
    finally:
        proc.terminate()
        proc.wait(30)
    assert "s3cret" not in log.read_text() and "wrong" not in log.read_text()


def test_https_proxy_and_no_proxy_from_the_environment():
    env = {"HTTPS_PROXY": "http://it%40hosp:p%3Ass@proxy.hospital.example:8080",
           "NO_PROXY": "localhost,.internal.example"}
    assert proxy_from_env("mqtt.federation.example", env) == (
        "proxy.hospital.example", 8080, "it@hosp", "p:ss")
    assert proxy_from_env("broker.internal.example", env) is None  # a NO_PROXY suffix
    assert proxy_from_env("localhost", env) is None
    assert proxy_from_env("mqtt.federation.example", {"https_proxy": "proxy:3128"}) == (
        "proxy", 3128, None, None)
    assert proxy_from_env("x", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}) is None
    assert proxy_from_env("x", {}) is None


# ------------------------------------------------------------------ fedsilo doctor

def _retain_coordinator_status(pki: PKI, tls_port: int, doc: dict | None) -> None:
    """What a coordinator leaves retained (None: nothing): the read half of a site's ACL is
    checked on it."""
    from agent.config.site import BrokerConfig
    from agent.federation import topics
    from agent.federation.transport import Transport

    t = Transport(f"fedsilo-{FED}-coordinator",
                  BrokerConfig(port=tls_port, tls=_tls(pki, "coordinator")))
    t.connect()
    t.close(final=(topics.coordinator_status(FED),
                   b"" if doc is None else json.dumps(doc).encode()))


@NEEDS_TINYPROXY
def test_doctor_walks_the_path_and_names_the_first_failure(network, tmp_path):
    from agent.ops.doctor import run_doctor

    pki, tls_port, wss_port, proxy_port, _net = network
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    _retain_coordinator_status(pki, tls_port, {"role": "coordinator", "state": "finished",
                                               "round": 2})
    good = _site_config(tmp_path, pki, "north", wss_port, proxy_port, tables[0],
                        "hospital:s3cret")
    lines: list[str] = []
    assert run_doctor(good, lines.append) == 0, lines
    assert [line.split()[1] for line in lines[:-1]] == ["certificate", "dns", "tcp", "proxy",
                                                        "tls", "agent", "mqtt", "acl"]
    assert all(line.startswith("ok") for line in lines[:-1]), lines
    assert " 200 " in lines[3]  # the proxy's answer to CONNECT
    assert "reads the coordinator's status (finished, round 2)" in lines[7], lines  # the newest
    assert "connect, publish and read" in lines[-1]

    _retain_coordinator_status(pki, tls_port, None)  # no coordinator yet: reading unproven
    lines = []
    idle = _site_config(tmp_path, pki, IDLE, wss_port, proxy_port, tables[0], "hospital:s3cret")
    assert run_doctor(idle, lines.append) == 0, lines
    assert lines[-2].startswith("warn  acl") and "has not run yet" in lines[-2], lines
    assert "reading is not proven" in lines[-1]

    lines = []
    bad = _site_config(tmp_path, pki, "south", wss_port, proxy_port, tables[1],
                       "hospital:wrong-pw-9")
    assert run_doctor(bad, lines.append) == 1
    assert lines[-1].startswith("FAIL  proxy") and "401" in lines[-1]
    assert "auth_file" in lines[-1] and not any("wrong-pw-9" in line for line in lines)

    lines = []
    closed = _site_config(tmp_path, pki, "north", wss_port, free_port(), tables[0],
                          "hospital:s3cret")
    assert run_doctor(closed, lines.append) == 1
    assert lines[-1].startswith("FAIL  tcp") and "refused or unreachable" in lines[-1]

    # the command itself: 1 and the steps on stdout; a config that is not there: 2, one line
    def doctor(cfg):
        return subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=120)

    done = doctor(closed)
    assert done.returncode == 1 and done.stdout.splitlines()[-1].startswith("FAIL  tcp")
    done = doctor(tmp_path / "missing.toml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "missing.toml" in done.stderr


@NEEDS_TINYPROXY
def test_doctor_names_an_identity_the_broker_acl_does_not_know(network, tmp_path):
    from agent.ops.doctor import run_doctor

    pki, _tls, wss_port, proxy_port, _net = network
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    pki.issue("site", "west")  # a valid certificate of the federation's CA, not in the roster
    lines: list[str] = []
    cfg = _site_config(tmp_path, pki, "west", wss_port, proxy_port, tables[0], "hospital:s3cret")
    assert run_doctor(cfg, lines.append) == 1, lines
    assert lines[-2].startswith("ok    mqtt")  # connected: the CA vouches for it
    assert lines[-1].startswith("FAIL  acl"), lines
    assert f"Not authorized on fedsilo/v1/{FED}/site/west/doctor" in lines[-1]
    assert "roster" in lines[-1]


@NEEDS_TINYPROXY
def test_doctor_leaves_the_session_to_a_running_agent(network, tmp_path):
    from agent.ops.doctor import run_doctor
    from agent.ops.statedir import hold_agent_lock

    pki, _tls, wss_port, proxy_port, _net = network
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    cfg = _site_config(tmp_path, pki, "north", wss_port, proxy_port, tables[0], "hospital:s3cret")
    (tmp_path / "north").mkdir()
    lock = hold_agent_lock(tmp_path / "north", str(cfg))  # as `fedsilo site run` does
    try:
        lines: list[str] = []
        assert run_doctor(cfg, lines.append) == 0, lines
        assert lines[-2].startswith("skip  agent") and f"pid {os.getpid()}" in lines[-2]
        assert not any(line.split()[1] in ("mqtt", "acl") for line in lines)
        with pytest.raises(Exception, match="another fedsilo agent"):
            hold_agent_lock(tmp_path / "north", str(cfg))  # nor may a second agent start
    finally:
        lock.close()
    assert hold_agent_lock(tmp_path / "north", str(cfg)).close() is None  # released

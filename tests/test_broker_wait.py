"""A broker that is down when the agent starts (issue 17.6): the daemons wait for it with a
capped, jittered back-off, saying so in the log, and work once it is up; SIGTERM ends the wait
at once with status 0; a broker that refuses them for good ends them with one line. Real
processes (`fedsilo site run`, `fedsilo coordinator run`) and a real Mosquitto started late on
the port they were told."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tomli_w import dumps

from agent.config import plan_to_toml_dict
from agent.federation import topics
from agent.federation.broker import LocalMosquitto, free_port
from tests.fedharness import STARTED, breast_cancer_sites, start_site, write_site_config
from tests.test_federation import FED, plan_for
from tests.test_lifecycle import read_retained

pytestmark = pytest.mark.integration


def start_coordinator(tmp_path: Path, port: int, plan, log: Path) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(dumps({"coordinator": {"id": "coordinator",
                                          "state_dir": str(tmp_path / "coord")},
                          "broker": {"host": "127.0.0.1", "port": port}}))
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(dumps(plan_to_toml_dict(plan)))
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "coordinator", "run", "--config",
                             str(cfg), "--plan", str(plan_file)], stdout=fh,
                            stderr=subprocess.STDOUT)
    STARTED.append(proc)  # killed after the test if it is still running
    return proc


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], count: int = 1,
                  timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text(errors="replace") if path.exists() else ""
        if got.count(text) >= count:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"{path.name}: exited {proc.returncode}: {got[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{path.name}: {text!r} not seen {count} time(s): {got[-2000:]}")


@pytest.fixture
def late_broker(tmp_path):
    """A port nothing listens on yet, and the Mosquitto to start on it later."""
    broker = LocalMosquitto(workdir=tmp_path / "broker", port=free_port())
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.workdir, ignore_errors=True)


def test_site_and_coordinator_started_before_the_broker_wait_for_it_then_federate(
        tmp_path, late_broker):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    port = late_broker.port
    site = start_site(write_site_config(tmp_path / "sites", "north", FED, port, tables[0]),
                      tmp_path / "north.log")
    coordinator = start_coordinator(tmp_path, port, plan_for(features, ["north"], rounds=2),
                                    tmp_path / "coordinator.log")
    # Both keep trying, one line per attempt with the next delay, no traceback.
    for proc, name in ((site, "north"), (coordinator, "coordinator")):
        log = wait_for_text(tmp_path / f"{name}.log", "trying again in", proc, count=3)
        assert f"cannot reach MQTT broker 127.0.0.1:{port}" in log and "Traceback" not in log
    time.sleep(3.0)
    assert site.poll() is None and coordinator.poll() is None

    late_broker.start()
    status = read_retained(port, topics.site_status(FED, "north"),
                           lambda d: d["state"] in ("idle", "training", "uploading",
                                                    "finished"), timeout=60)
    assert status["id"] == "north"
    assert coordinator.wait(timeout=180) == 0
    assert site.wait(timeout=60) == 0
    log = (tmp_path / "coordinator.log").read_text()
    assert f"federation {FED} finished" in log and "Traceback" not in log
    assert "round 2/2 closed: 1 sites" in log
    assert (tmp_path / "coord" / "model" / "model.json").exists()


def test_sigterm_while_waiting_for_the_broker_exits_0_at_once(tmp_path):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    port = free_port()
    site = start_site(write_site_config(tmp_path / "sites", "north", FED, port, tables[0]),
                      tmp_path / "north.log")
    coordinator = start_coordinator(tmp_path, port, plan_for(features, ["north"], rounds=1),
                                    tmp_path / "coordinator.log")
    for proc, name in ((site, "north"), (coordinator, "coordinator")):
        # SIGTERM in the middle of a wait of three seconds or more: the wait ends at once.
        wait_for_long_delay(tmp_path / f"{name}.log", 3.0, proc)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2
        log = (tmp_path / f"{name}.log").read_text()
        assert "stop requested while waiting for the MQTT broker" in log
        assert "Traceback" not in log


def wait_for_long_delay(path: Path, at_least_s: float, proc: subprocess.Popen[bytes],
                        timeout: float = 90.0) -> None:
    """Until the last attempt logged says the next one is at least `at_least_s` away."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text(errors="replace") if path.exists() else ""
        delays = re.findall(r"trying again in ([0-9.]+) s", got)
        if delays and float(delays[-1]) >= at_least_s:
            return
        if proc.poll() is not None:
            raise AssertionError(f"{path.name}: exited {proc.returncode}: {got[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{path.name}: no wait of {at_least_s} s within {timeout} s")


def test_a_broker_that_refuses_for_good_ends_the_daemon_with_one_line(tmp_path):
    """Not authorized (here: anonymous clients are not allowed) cannot be fixed by waiting:
    exit status 1 and one line, so the operator sees it at once (systemd restarts it a few
    times, then leaves it failed)."""
    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    port = free_port()
    conf = tmp_path / "refusing.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n")
    broker = LocalMosquitto(workdir=tmp_path / "broker", port=port, config=conf).start()
    try:
        cfg = write_site_config(tmp_path / "sites", "north", FED, port, tables[0])
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "agent", "site", "run", "--config",
                              str(cfg)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and time.monotonic() - started < 30
        assert "Traceback" not in run.stderr and "trying again" not in run.stderr
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith(f"fedsilo: MQTT broker 127.0.0.1:{port} refused")
        assert "Not authorized" in last or "authoris" in last.lower(), last
    finally:
        broker.stop()

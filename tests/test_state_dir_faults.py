"""A state directory that refuses writes: read-only at start, or a disk that fills up mid-run.

Real filesystems: a small tmpfs mounted by the test (filled to ENOSPC, or remounted read-only),
real processes and a real Mosquitto. The operator must see one line and a status reason
(`state_not_writable`, `disk_full`), never a traceback, and nothing may be lost: once space is
back the federation goes on from where it was.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.federation import topics
from tests.fedharness import (
    breast_cancer_sites,
    start_coordinator,
    start_site,
    stop_all,
    write_coordinator_files,
    write_site_config,
)
from tests.test_crash_recovery import closed_rounds, wait_for_line
from tests.test_federation import FED, launch, plan_for
from tests.test_lifecycle import read_retained

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs of the test's own (root only: `make test` in CI runs as root)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60)


def test_read_only_state_directory_is_one_line_at_start(tmp_path, small_fs, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    state = small_fs / "north"
    state.mkdir()
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "sites" / "north"), str(state)))
    ccfg, plan_file, cstate = write_coordinator_files(small_fs / "coord",
                                                      plan_for(features, ["north"]),
                                                      mosquitto.port)
    cstate.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for args in (("site", "run", "--config", str(cfg)),
                 ("coordinator", "run", "--config", str(ccfg), "--plan", str(plan_file))):
        done = run_cli(*args)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr
        assert lines[-1].startswith("fedsilo: cannot write state in ")
        assert "state_not_writable" in lines[-1] and "Read-only file system" in lines[-1]


def test_coordinator_on_a_full_disk_says_so_and_goes_on_once_space_is_back(
        tmp_path, small_fs, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    plan = plan_for(features, names, rounds=3)
    cfg, plan_file, state = write_coordinator_files(small_fs / "coord", plan, mosquitto.port)
    log = tmp_path / "coord.log"
    coordinator = start_coordinator(cfg, plan_file, log)
    read_retained(mosquitto.port, topics.coordinator_status(FED),
                  lambda d: d["state"] == "stats")
    filler = fill(small_fs)  # full before the statistics step's checkpoint
    sites = launch(tmp_path, mosquitto.port, names, tables[:2])
    status = read_retained(mosquitto.port, topics.coordinator_status(FED),
                           lambda d: d.get("last_error") == "disk_full", timeout=60)
    assert status["round"] == 0
    assert coordinator.poll() is None
    filler.unlink()
    assert coordinator.wait(120) == 0, log.read_text()[-3000:]
    assert stop_all(sites) == [0, 0]
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("disk_full") == 1  # one line while it lasted, not one per retry
    assert "checkpoint written: the state directory takes writes again" in text
    assert closed_rounds(state) == [1, 2, 3]


def test_site_on_a_full_disk_says_so_and_answers_once_space_is_back(
        tmp_path, small_fs, mosquitto):
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    plan = plan_for(features, names, rounds=2, deadline=600.0)
    south = launch(tmp_path, mosquitto.port, names[1:], tables[1:2])
    cfg = write_site_config(tmp_path / "sites", "north", FED, mosquitto.port, tables[0])
    state = small_fs / "north"
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "sites" / "north"), str(state)))
    log = tmp_path / "north.log"
    north = start_site(cfg, log)
    read_retained(mosquitto.port, topics.site_status(FED, "north"), lambda d: d["state"] == "idle")
    filler = fill(small_fs)  # full before north can keep its first reply
    ccfg, plan_file, cstate = write_coordinator_files(tmp_path / "coord", plan, mosquitto.port)
    coordinator = start_coordinator(ccfg, plan_file, tmp_path / "coord.log")
    status = read_retained(mosquitto.port, topics.site_status(FED, "north"),
                           lambda d: d.get("last_error") == "disk_full", timeout=60)
    assert status["state"] == "error"
    wait_for_line(log, "not answered: cannot write state in")
    assert north.poll() is None
    filler.unlink()
    assert coordinator.wait(120) == 0
    assert stop_all([north, *south]) == [0, 0]
    text = log.read_text()
    assert "Traceback" not in text
    assert "the state directory takes writes again" in text
    assert closed_rounds(cstate) == [1, 2]


def test_a_second_agent_on_the_same_state_directory_exits_2_naming_the_first(tmp_path):
    """Two agents on one state directory would push each other off the broker (same
    certificate, same client id) and overwrite each other's state: the second is refused."""
    from agent.federation.broker import free_port
    from agent.ops.statedir import agent_lock_holder

    tables, _test, _features = breast_cancer_sites(tmp_path / "data")
    cfg = write_site_config(tmp_path, "north", FED, free_port(), tables[0])  # nothing listens
    first = start_site(cfg, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 60
        while agent_lock_holder(tmp_path / "north") != str(first.pid):  # it holds the lock
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "agent", "site", "run", "--config",
                                 str(cfg)], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        line = second.stderr.strip().splitlines()[-1]  # after its start-up log lines
        assert line.startswith("fedsilo: ") and "site.state_dir" in line
        assert f"another fedsilo agent (pid {first.pid}) already runs with" in line
        assert first.poll() is None  # the first one is left alone
    finally:
        stop_all([first])

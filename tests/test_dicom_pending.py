"""Series that arrive before any plan (listener, watch folder) wait for a grid: completed by
`fedsilo ingest --complete`, or by a running site as soon as a task brings the plan."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from tomli_w import dumps

from agent.config import DicomSources, ImagingSpec, load_site_config, plan_to_toml_dict
from agent.demo.run import demo_plan
from agent.errors import DataError
from agent.federation.envelope import BodyKind, make_manifest
from agent.federation.site import Site
from agent.ingest.pipeline import IngestPipeline
from tests.test_dicom_helpers import write_series

IMAGING = ImagingSpec(modality="CT", depth=4, size=16)
AET, CALLER = "FEDSILO", "PACS"


def _plan(sites: list[str] = ["alpha"]):  # noqa: B006 - read only
    return dataclasses.replace(demo_plan(sites, rounds=1, seed=0), imaging=IMAGING)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "ingest", *argv], capture_output=True,
                          text=True, timeout=120)


def test_complete_finishes_series_that_waited_without_a_plan(tmp_path):
    state = tmp_path / "state"
    p = IngestPipeline(state, None, kernel_backend="reference")  # as the site's service
    try:
        for path in write_series(tmp_path / "in", 5):
            assert p.ingest_file(path, source="listener").status == "stored"
        assert p.complete_series(quiet_s=0.0) == []  # no grid: they wait
        assert p.summary()["series_pending"] == 1
    finally:
        p.close()
    plan = tmp_path / "plan.toml"
    plan.write_text(dumps(plan_to_toml_dict(_plan())))
    run = _cli("--complete", "--state", str(state), "--plan", str(plan), "--json",
               "--backend", "reference")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["series_complete"] == 1 and summary["series_pending"] == 0
    assert summary["stored"] == 0 and summary["instances"] == 5  # nothing read again


@pytest.mark.parametrize("argv", [["--state", "S"], ["--complete", "IN", "--state", "S"]])
def test_ingest_needs_a_path_or_complete_not_both(tmp_path, argv):
    run = _cli(*[str(tmp_path / a) if a in ("S", "IN") else a for a in argv])
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: fedsilo ingest: PATH: give one "), \
        lines
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu) not found")
def test_a_running_site_completes_listener_series_when_a_task_brings_the_plan(tmp_path):
    cfg = tmp_path / "alpha.toml"
    cfg.write_text(dumps({"site": {"id": "alpha", "federation": "stroke-demo",
                                   "state_dir": str(tmp_path / "state")},
                          "broker": {"host": "127.0.0.1", "port": 1}}))
    config = dataclasses.replace(load_site_config(cfg), dicom=DicomSources(
        listen=True, ae_title=AET, port=0, bind="127.0.0.1", allowed_callers=(CALLER,),
        series_quiet_s=0.2))
    site = Site(config, backend="reference")  # no broker needed: the task is handed in
    ingest = site._ingest_service()  # as run() does for a site with a listener
    try:
        files = write_series(tmp_path / "pacs", 5)
        sent = subprocess.run(["storescu", "-aet", CALLER, "-aec", AET, "127.0.0.1",
                               str(ingest.listener_port), *map(str, files)],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, TCP_NODELAY="1"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait(lambda: ingest.status_extra()["ingest_stored"] == 5)
        time.sleep(1.5)  # quiet and past a completion pass: without a grid nothing happens
        assert ingest.pipeline.summary()["series_pending"] == 1

        task = make_manifest(federation="stroke-demo", round=0, sender="coordinator",
                             body_kind=BodyKind.STATS_TASK, body=b"", created=time.time(),
                             meta={"run": "r1", "plan": plan_to_toml_dict(_plan())})
        with pytest.raises(DataError, match="data.table is not set"):
            site._on_task(task, b"")  # a listener-only site: no table to train on yet
        _wait(lambda: ingest.status_extra()["series_complete"] == 1)
        assert len(ingest.pipeline.store.series_for_patients(IMAGING)) == 1
    finally:
        ingest.stop()


def _wait(done, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu) not found")
def test_a_listener_only_site_process_completes_its_series_when_the_first_task_arrives(
        tmp_path, mosquitto):
    """The same over the wire: a `fedsilo site run` process with a listener and no table,
    a real Mosquitto, a real coordinator; its retained status shows the series complete."""
    from agent.federation import topics
    from agent.federation.broker import free_port
    from tests.fedharness import CoordinatorThread, start_site, stop_all
    from tests.test_lifecycle import read_retained

    plan = _plan()
    port = free_port()
    cfg = tmp_path / "alpha.toml"
    cfg.write_text(dumps({
        "site": {"id": "alpha", "federation": plan.federation,
                 "state_dir": str(tmp_path / "state")},
        "broker": {"host": "127.0.0.1", "port": mosquitto.port},
        "dicom": {"listen": True, "ae_title": AET, "port": port, "bind": "127.0.0.1",
                  "allowed_callers": [CALLER], "series_quiet_s": 0.2}}))
    site = start_site(cfg, tmp_path / "alpha.log")
    status = topics.site_status(plan.federation, "alpha")
    read_retained(mosquitto.port, status, lambda d: d["state"] == "idle", timeout=60)
    files = write_series(tmp_path / "pacs", 5)
    sent = subprocess.run(["storescu", "-aet", CALLER, "-aec", AET, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    time.sleep(1.5)  # quiet, and past a completion pass: without a grid nothing completes
    waiting = read_retained(mosquitto.port, status, lambda d: d.get("ingest_stored") == 5,
                            timeout=30)
    assert waiting.get("series_complete", 0) == 0
    coord = CoordinatorThread(plan, mosquitto.port, tmp_path / "coord").start()
    try:
        done = read_retained(mosquitto.port, status,
                             lambda d: d.get("series_complete") == 1, timeout=60)
        assert done["last_error"] == "data_error"  # no table to train on: said, not hidden
    finally:
        coord.coordinator.stop_event.set()
        coord.thread.join(20)
    site.send_signal(2)  # SIGINT, as Ctrl-C
    assert stop_all([site]) == [0]

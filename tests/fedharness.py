"""Helpers to run real federations in tests: sites as `fedsilo site run` processes, the
coordinator in a thread of the test process, all against a real Mosquitto."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from tomli_w import dumps

from agent.config import BrokerConfig, CoordinatorConfig, FeatureSpec, IdentityFiles, Plan
from agent.config.site import TLSFiles
from agent.federation.coordinator import Coordinator


def write_site_config(directory: Path, site: str, federation: str, port: int, table: Path,
                      holdout: float = 0.2, tls: dict[str, str] | None = None,
                      identity: dict[str, str] | None = None,
                      policy: dict[str, Any] | None = None,
                      privacy: dict[str, Any] | None = None) -> Path:
    """`tls`: {"ca": ..., "cert": ..., "key": ...} for a broker that wants certificates;
    `identity`: the same keys for signing without TLS; `policy`, `privacy`: those tables."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / f"{site}.toml"
    broker: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if tls is not None:
        broker["tls"] = tls
    doc = {
        "site": {"id": site, "federation": federation, "state_dir": str(directory / site)},
        "broker": broker,
        "data": {"table": str(table), "holdout_fraction": holdout},
    }
    if identity is not None:
        doc["identity"] = identity
    if policy is not None:
        doc["policy"] = policy
    if privacy is not None:
        doc["privacy"] = privacy
    cfg.write_text(dumps(doc))
    return cfg


STARTED: list[subprocess.Popen[bytes]] = []  # killed after each test by conftest


def start_site(config: Path, log: Path, env: dict[str, str] | None = None,
               append: bool = False) -> subprocess.Popen[bytes]:
    """`env`: extra environment (e.g. a crash point); `append`: keep the log of a run before."""
    fh = open(log, "ab" if append else "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "site", "run", "--config",
                             str(config)], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """A failed test must not leave site processes behind (they would reconnect forever)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class CoordinatorThread:
    def __init__(self, plan: Plan, port: int, state_dir: Path,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 tls: TLSFiles | None = None, identity: IdentityFiles | None = None) -> None:
        self.coordinator = Coordinator(
            CoordinatorConfig(state_dir=state_dir, broker=BrokerConfig(port=port, tls=tls),
                              identity=identity),
            plan, on_round=on_round)
        self.final: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.final = self.coordinator.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in join()
            self.error = exc

    def start(self) -> CoordinatorThread:
        self.thread.start()
        return self

    def join(self, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.coordinator.stop_event.set()
            self.thread.join(10)
            raise AssertionError(f"federation did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.final is not None
        return self.final


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.terminate()
            codes.append(p.wait(timeout=10))
    return codes


def breast_cancer_sites(directory: Path, n_sites: int = 3, seed: int = 0):
    """sklearn's bundled breast-cancer data (real measurements) split with label skew."""
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.3,
                                              stratify=data.target, random_state=seed)
    rng = np.random.default_rng(seed)
    skew = {1: [0.6, 0.3, 0.1], 0: [0.15, 0.35, 0.5]}
    owner = np.array([rng.choice(n_sites, p=skew[int(y)]) for y in y_tr])

    def write(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*names, "label"])
            for row, label in zip(x, y, strict=True):
                w.writerow([*(f"{v:.6g}" for v in row), int(label)])
        return path

    directory.mkdir(parents=True, exist_ok=True)
    tables = [write(directory / f"site{i}.csv", x_tr[owner == i], y_tr[owner == i])
              for i in range(n_sites)]
    test = write(directory / "test.csv", x_te, y_te)
    features = tuple(FeatureSpec(n, "numeric") for n in names)
    return tables, test, features


def write_coordinator_files(directory: Path, plan: Plan, port: int) -> tuple[Path, Path, Path]:
    """(coordinator.toml, plan.toml, state_dir) for a coordinator run as its own process."""
    from agent.config import plan_to_toml_dict

    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "state"
    cfg = directory / "coordinator.toml"
    cfg.write_text(dumps({"coordinator": {"state_dir": str(state)},
                          "broker": {"host": "127.0.0.1", "port": port}}))
    plan_file = directory / "plan.toml"
    plan_file.write_text(dumps(plan_to_toml_dict(plan)))
    return cfg, plan_file, state


def start_coordinator(cfg: Path, plan_file: Path, log: Path,
                      env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`fedsilo coordinator run` as a real process (so a test can kill -9 it)."""
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "coordinator", "run", "--config",
                             str(cfg), "--plan", str(plan_file)], stdout=fh,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    STARTED.append(proc)
    return proc

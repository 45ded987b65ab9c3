"""Helpers to run real federations in tests: sites as `fedsilo site run` processes, the
coordinator in a thread of the test process, all against a real Mosquitto."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tomli_w import dumps

from agent.config import BrokerConfig, CoordinatorConfig, Plan
from agent.federation.coordinator import Coordinator


def write_site_config(directory: Path, site: str, federation: str, port: int, table: Path,
                      holdout: float = 0.2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / f"{site}.toml"
    cfg.write_text(dumps({
        "site": {"id": site, "federation": federation, "state_dir": str(directory / site)},
        "broker": {"host": "127.0.0.1", "port": port},
        "data": {"table": str(table), "holdout_fraction": holdout},
    }))
    return cfg


def start_site(config: Path, log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "agent", "site", "run", "--config",
                             str(config)], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


class CoordinatorThread:
    def __init__(self, plan: Plan, port: int, state_dir: Path,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.coordinator = Coordinator(
            CoordinatorConfig(state_dir=state_dir, broker=BrokerConfig(port=port)), plan,
            on_round=on_round)
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

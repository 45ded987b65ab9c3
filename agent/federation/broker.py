"""A local Mosquitto for the demo and the tests: own config, free loopback port, own directory.

We embed the real broker hospitals run rather than a pure-Python one: amqtt (the maintained
PyPI broker) speaks MQTT 3.1.1 only and moved ~60 MB/s on loopback here against Mosquitto's
300+ MB/s, and testing against the broker we deploy is worth more than a pip-only install.
`make demo` / `make test` install the Debian package `mosquitto` when it is missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from agent.errors import BrokerError

MOSQUITTO_HINT = ("Mosquitto not found: install the Debian/Ubuntu package 'mosquitto' "
                  "(apt-get install mosquitto) or put the mosquitto binary on PATH")


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str,
                   timeout_s: float = 30.0) -> None:
    """Until a child we started accepts TCP on the loopback `port` (demo and tests: a site's
    DICOM listener, dcmtk's storescp); RuntimeError when it exits first or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


class LocalMosquitto:
    """Start/stop a Mosquitto on 127.0.0.1 with plain MQTT (demo and tests only), or with a
    config written elsewhere (`config`: e.g. `fedsilo broker-config`'s, listening on `port`)."""

    def __init__(self, workdir: Path | None = None, port: int | None = None,
                 extra_config: str = "", config: Path | None = None) -> None:
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError(MOSQUITTO_HINT)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedsilo-mq-"))
        self.port = port or free_port()
        self.extra_config = extra_config
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.config or self.workdir / "mosquitto.conf"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        self.config_path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {data}/\n"
            "autosave_interval 1\n"
            # 1 MiB chunks + envelope header, with margin; Mosquitto 2.1's default is 2,000,000.
            "max_packet_size 2000000\n"
            "max_queued_messages 10000\n"
            "max_inflight_messages 64\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + self.extra_config
        )
        self._allow_broker_user(data)

    def _allow_broker_user(self, data: Path) -> None:
        # Started as root, Mosquitto drops to the 'mosquitto' user: it must be able to write its
        # persistence and log files (DESIGN.md, "Facts that bite").
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        for p in (self.workdir, data):
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(self.workdir, 0o755)
        log = self.workdir / "mosquitto.log"
        log.touch()
        os.chown(log, user.pw_uid, user.pw_gid)

    def start(self, timeout_s: float = 10.0) -> LocalMosquitto:
        if self.config is None:
            self.write_config()
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited at start: {err.strip()[:500]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

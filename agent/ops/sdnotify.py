"""systemd's notify protocol (sd_notify(3)), self-written: a few datagrams to $NOTIFY_SOCKET.

Under a `Type=notify` unit the agent says READY=1 once it is connected to the broker and set up,
STATUS=… as its state changes, STOPPING=1 when it shuts down, EXTEND_TIMEOUT_USEC while a slow
start (a cold Numba cache) is still going, and WATCHDOG=1 while it is alive. Outside systemd
(no NOTIFY_SOCKET) every call is a no-op, so the same code runs in a terminal or a test.

The watchdog pings come from a small thread, but only while the main loop keeps beating: the
main loop beats on every iteration and the trainer after every batch. A main loop stuck for
the whole watchdog interval stops the pings, and systemd restarts the agent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (pid is None or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # systemd gone or socket unreachable: never fatal
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def waiting(self, text: str, next_try_s: float) -> None:
        """Still starting, waiting on something outside (the broker): say so, and ask systemd
        for time until the next try, so a long outage does not fail the start (the watchdog
        itself only runs after READY)."""
        self.beat()
        self.send(f"STATUS={text}", f"EXTEND_TIMEOUT_USEC={int((next_try_s + 60) * 1e6)}")

    def stopping(self, status: str = "stopping") -> None:
        self._stop.set()
        self.send("STOPPING=1", f"STATUS={status}")

    def beat(self) -> None:
        """The main loop (or the trainer) is alive."""
        self._last_beat = time.monotonic()

    def start_watchdog(self) -> None:
        """Ping at half the interval systemd asked for, while beats keep coming."""
        if self.watchdog_s is None or not self.address or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="sd-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        assert self.watchdog_s is not None
        interval = self.watchdog_s / 2
        while not self._stop.wait(interval):
            if time.monotonic() - self._last_beat < self.watchdog_s:
                self.send("WATCHDOG=1")
            else:
                log.error("main loop silent for %.0f s: no watchdog ping (systemd will restart "
                          "the agent)", time.monotonic() - self._last_beat)

"""Training that yields to clinical work: a time window, and a pause while the host is busy.

A site's `[policy]` may confine training to local hours (`training_hours = "19:00-07:00"`)
and pause between batches while *other* work keeps the host's CPUs above `busy_cpu_percent`.
The trainer asks `Throttle.reason()` before the first batch and after every one; while it
names a reason the site waits (watchdog still fed, a stop request still honoured) and its
status says `throttled: true` with that reason. A batch in progress always finishes.

"Other work" is the whole host's CPU time minus this process's own, so training at full speed
never throttles itself. The pure parts (window arithmetic, the busy figure from two samples)
are separate from the sampling so they can be tested exactly.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

OUTSIDE_HOURS = "outside_training_hours"
HOST_BUSY = "host_busy"
SAMPLE_EVERY_S = 1.0  # the busy figure is taken over at least this long

_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class TrainingPolicy:
    """`[policy]` of a site config; the defaults throttle nothing."""

    training_hours: tuple[int, int] | None = None  # (start, end) minutes after local midnight
    busy_cpu_percent: float = 0.0  # 0 = never pause for other work


def parse_hours(text: str) -> tuple[int, int]:
    """'19:00-07:00' -> (1140, 420); raises ValueError naming the expected form."""
    m = _HOURS.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM (24-hour local time, e.g. 19:00-07:00)")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise ValueError(f"{text!r} is an empty window (leave training_hours out for always)")
    return start, end


def in_window(hours: tuple[int, int], minute_of_day: int) -> bool:
    """Start inclusive, end exclusive; a window past midnight (start > end) wraps."""
    start, end = hours
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


@dataclass(frozen=True)
class CpuSample:
    wall: float  # seconds (monotonic)
    host_busy: float  # CPU-seconds all cores spent on anything but idle/iowait
    own: float  # CPU-seconds this process spent


def others_percent(a: CpuSample, b: CpuSample, cores: int) -> float:
    """Share of the host's CPU capacity that work other than ours used between two samples."""
    capacity = (b.wall - a.wall) * max(1, cores)
    if capacity <= 0:
        return 0.0
    other = (b.host_busy - a.host_busy) - (b.own - a.own)
    return min(100.0, max(0.0, 100.0 * other / capacity))


def sample_cpu() -> CpuSample:
    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return CpuSample(time.monotonic(), busy, own.user + own.system)


class Throttle:
    """Why training should wait right now (None: it may go on)."""

    def __init__(self, policy: TrainingPolicy, *, cores: int,
                 now: Callable[[], dt.datetime] = dt.datetime.now,
                 sampler: Callable[[], CpuSample] = sample_cpu,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.cores = cores
        self._now = now
        self._sampler = sampler
        self._clock = clock
        self._last: CpuSample | None = None
        self._busy = False

    def reason(self) -> str | None:
        hours = self.policy.training_hours
        if hours is not None:
            t = self._now()
            if not in_window(hours, t.hour * 60 + t.minute):
                return OUTSIDE_HOURS
        if self.policy.busy_cpu_percent > 0 and self._host_busy():
            return HOST_BUSY
        return None

    def _host_busy(self) -> bool:
        """Re-measured once at least SAMPLE_EVERY_S has passed, the last verdict until then:
        asked after every batch, so it must cost next to nothing between samples."""
        if self._last is not None and self._clock() - self._last.wall < SAMPLE_EVERY_S:
            return self._busy
        sample = self._sampler()
        if self._last is not None:
            others = others_percent(self._last, sample, self.cores)
            self._busy = others > self.policy.busy_cpu_percent
        self._last = sample
        return self._busy

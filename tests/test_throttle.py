"""The training policy's pure parts: window arithmetic, the "other work" figure, the verdict over
time (fake clock and CPU samples: unit tests of logic), and its config errors."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.config import load_site_config
from agent.errors import ConfigError
from agent.ops.throttle import (
    HOST_BUSY,
    OUTSIDE_HOURS,
    SAMPLE_EVERY_S,
    CpuSample,
    Throttle,
    TrainingPolicy,
    in_window,
    others_percent,
    parse_hours,
)


def test_parse_hours():
    assert parse_hours("19:00-07:00") == (19 * 60, 7 * 60)
    assert parse_hours(" 08:30-17:45 ") == (510, 1065)
    for bad in ("19-07", "24:00-07:00", "7:00-08:00", "19:00 - 07:00", "19:60-07:00", ""):
        with pytest.raises(ValueError, match="HH:MM-HH:MM"):
            parse_hours(bad)
    with pytest.raises(ValueError, match="empty window"):
        parse_hours("06:00-06:00")


@pytest.mark.parametrize("hours,minute,inside", [
    ((8 * 60, 17 * 60), 8 * 60, True),  # start inclusive
    ((8 * 60, 17 * 60), 17 * 60, False),  # end exclusive
    ((8 * 60, 17 * 60), 7 * 60 + 59, False),
    ((19 * 60, 7 * 60), 23 * 60, True),  # past midnight
    ((19 * 60, 7 * 60), 0, True),
    ((19 * 60, 7 * 60), 6 * 60 + 59, True),
    ((19 * 60, 7 * 60), 7 * 60, False),
    ((19 * 60, 7 * 60), 12 * 60, False),
])
def test_in_window(hours, minute, inside):
    assert in_window(hours, minute) is inside


def test_others_percent_leaves_our_own_cpu_out():
    a = CpuSample(wall=0.0, host_busy=100.0, own=10.0)
    # 2 s on 4 cores = 8 CPU-seconds: the host spent 6, we spent 4 of them: others 2 = 25 %
    assert others_percent(a, CpuSample(2.0, 106.0, 14.0), cores=4) == pytest.approx(25.0)
    # training flat out on every core is never "other work"
    assert others_percent(a, CpuSample(2.0, 108.0, 18.0), cores=4) == 0.0
    assert others_percent(a, CpuSample(2.0, 200.0, 10.0), cores=4) == 100.0  # clamped
    assert others_percent(a, a, cores=4) == 0.0  # no time passed


class Host:
    """A fake host clock and CPU counters: `others` CPU-seconds of other work per second."""

    def __init__(self, others_per_s: float) -> None:
        self.wall, self.busy, self.others, self.samples = 0.0, 0.0, others_per_s, 0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.busy += seconds * self.others

    def sample(self) -> CpuSample:
        self.samples += 1
        return CpuSample(self.wall, self.busy, 0.0)


def test_throttle_verdicts():
    noon = dt.datetime(2026, 11, 28, 12, 0)
    assert Throttle(TrainingPolicy(), cores=2, now=lambda: noon).reason() is None
    night = TrainingPolicy(training_hours=parse_hours("19:00-07:00"))
    assert Throttle(night, cores=2, now=lambda: noon).reason() == OUTSIDE_HOURS
    assert Throttle(night, cores=2, now=lambda: noon.replace(hour=22)).reason() is None

    host = Host(others_per_s=1.8)  # 90 % of 2 cores
    t = Throttle(TrainingPolicy(busy_cpu_percent=80), cores=2, now=lambda: noon,
                 sampler=host.sample, clock=lambda: host.wall)
    assert t.reason() is None and host.samples == 1  # one sample is no measurement yet
    for _ in range(100):  # every batch asks; between samples nothing is measured
        host.advance(SAMPLE_EVERY_S / 200)
        assert t.reason() is None
    assert host.samples == 1
    host.advance(SAMPLE_EVERY_S / 2)
    assert t.reason() == HOST_BUSY and host.samples == 2  # 90 % > 80 %
    host.others = 0.2
    host.advance(SAMPLE_EVERY_S / 2)
    assert t.reason() == HOST_BUSY  # the verdict holds until the next full interval
    host.advance(SAMPLE_EVERY_S / 2)
    assert t.reason() is None and host.samples == 3
    # outside the hours wins even while the host is quiet
    both = TrainingPolicy(training_hours=(19 * 60, 7 * 60), busy_cpu_percent=80)
    quiet = Host(0.0)
    assert Throttle(both, cores=2, now=lambda: noon, sampler=quiet.sample,
                    clock=lambda: quiet.wall).reason() == OUTSIDE_HOURS


def site_config(tmp_path, policy: str):
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[site]\nid = "north"\nfederation = "fed"\nstate_dir = "state"\n{policy}')
    return load_site_config(cfg)


def test_policy_config(tmp_path):
    assert site_config(tmp_path, "").policy == TrainingPolicy()
    p = site_config(tmp_path, '[policy]\ntraining_hours = "20:00-06:00"\nbusy_cpu_percent = 75\n')
    assert p.policy == TrainingPolicy(training_hours=(1200, 360), busy_cpu_percent=75)
    for text, key in (('training_hours = "8-17"', "policy.training_hours"),
                      ("busy_cpu_percent = 120", "policy.busy_cpu_percent"),
                      ("pause = true", "policy")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            site_config(tmp_path, f"[policy]\n{text}\n")

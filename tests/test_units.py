"""The systemd units in packaging/: `systemd-analyze verify` has nothing to say about them (any
output fails), `systemd-analyze security --offline` rates them below an exposure threshold,
and they keep the promises the service relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "packaging" / "systemd"
FEDSILO = Path(sys.executable).parent / "fedsilo"  # this environment's entry point
THRESHOLD = 20  # systemd's exposure scale x 10: "2.0", where 10.0 is a service left wide open


@pytest.fixture(autouse=True)
def _systemd_analyze():
    if shutil.which("systemd-analyze") is None:  # `make test` installs it: a miss is a failure
        pytest.fail("systemd-analyze missing: `make test` installs the systemd package")


def placed(tmp_path: Path, name: str, dropins: tuple[str, ...] = ()) -> Path:
    """The unit as the package installs it, with ExecStart pointing at this checkout's fedsilo
    (verify checks that the binary exists)."""
    unit = tmp_path / name
    unit.write_text((UNITS / name).read_text().replace("/usr/bin/fedsilo", str(FEDSILO)))
    if dropins:
        d = tmp_path / f"{name}.d"
        d.mkdir()
        for dropin in dropins:
            shutil.copyfile(UNITS / "examples" / dropin, d / dropin)
    return unit


@pytest.mark.parametrize("name", ["fedsilo-site.service", "fedsilo-coordinator.service"])
def test_units_verify_silently_and_stay_below_the_exposure_threshold(tmp_path, name):
    unit = placed(tmp_path, name)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true",
                               f"--threshold={THRESHOLD}", str(unit)], capture_output=True,
                              text=True, cwd=tmp_path)
    assert security.returncode == 0, security.stdout[-2000:]
    text = (UNITS / name).read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=",
                 "User=fedsilo", "StateDirectory=fedsilo", "ConfigurationDirectory=fedsilo",
                 "LimitCORE=0", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "PrivateTmp=yes", "ProtectHome=yes", "CapabilityBoundingSet=\n"):
        assert line in text, line
    assert "\nMemoryDenyWriteExecute" not in text  # Numba's JIT needs W+X pages


def test_the_low_port_and_ip_allow_drop_ins_verify(tmp_path):
    unit = placed(tmp_path, "fedsilo-site.service", ("low-port.conf", "ip-allow.conf"))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr

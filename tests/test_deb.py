"""The Debian package: `packaging/build-deb.sh` (what `make deb` runs) builds it, `dpkg -i`
installs it on this machine, the installed `fedsilo` runs and accepts its example configs, and
`dpkg --purge` leaves nothing behind (files, state, the system user)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, **kw)


@pytest.fixture
def installable():
    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian system: no dpkg")
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root (CI and `make test` in the image run as "
                    "root)")
    if run("dpkg", "-s", "fedsilo").returncode == 0:
        pytest.skip("fedsilo is really installed on this machine; the test would replace it")


def test_the_package_builds_installs_runs_and_purges(installable, tmp_path):
    build = run("bash", str(ROOT / "packaging" / "build-deb.sh"), str(tmp_path), timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    deb = Path(build.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("fedsilo_") and deb.suffix == ".deb"
    info = run("dpkg-deb", "--field", str(deb), "Package", "Depends").stdout
    assert "fedsilo" in info and "python3" in info
    try:
        assert run("dpkg", "-i", str(deb), timeout=300).returncode == 0
        version = run("/usr/bin/fedsilo", "--version")
        assert version.returncode == 0 and version.stdout.startswith("fedsilo ")
        for example in ("site", "coordinator", "plan"):
            check = run("fedsilo", "config", "check", f"/etc/fedsilo/{example}.toml")
            assert check.returncode == 0, check.stderr
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "fedsilo").stdout
        assert all(f"/etc/fedsilo/{e}.toml" in conffiles for e in ("site", "coordinator",
                                                                    "plan"))
        assert run("getent", "passwd", "fedsilo").returncode == 0  # the system user
        assert Path("/lib/systemd/system/fedsilo-site.service").is_file()
        hardware = run("fedsilo", "hardware", "show")
        assert hardware.returncode == 0 and "cpu        available" in hardware.stdout
    finally:
        purge = run("dpkg", "--purge", "fedsilo", timeout=300)
    assert purge.returncode == 0, purge.stderr
    for gone in ("/opt/fedsilo", "/etc/fedsilo", "/usr/bin/fedsilo",
                 "/lib/systemd/system/fedsilo-site.service"):
        assert not Path(gone).exists(), gone
    assert run("getent", "passwd", "fedsilo").returncode != 0

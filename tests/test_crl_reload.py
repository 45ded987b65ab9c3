"""The CRL is watched, not read once: a revocation takes effect without a restart, and a CRL
past its nextUpdate fails closed (`crl_stale`) until `fedsilo pki crl` re-signs it."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.config import IdentityFiles
from agent.errors import ProtocolError
from agent.federation.envelope import BodyKind, make_manifest
from agent.federation.peer import Trust
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier


def _fedsilo(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *argv], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    for argv in (["init", "--federation", "fed"], ["issue", "site", "north"],
                 ["issue", "site", "south"]):
        run = _fedsilo("pki", *argv, "--dir", str(d))
        assert run.returncode == 0, run.stderr
    return d


class Clock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


def _signed(d, name="north"):
    m = make_manifest(federation="fed", round=1, sender=name, body_kind=BodyKind.UPDATE,
                      body=b"\x02" * 100, created=1.5e9, meta={})
    return Signer(d / f"{name}.crt", d / f"{name}.key").sign(m.header())


def _reason(v: Verifier, h, sender="north") -> str | None:
    try:
        v.verify(h, sender=sender, role="site")
    except ProtocolError as exc:
        return exc.reason
    return None


def _write_crl(d, next_update: dt.datetime) -> None:
    """A CRL signed by the real CA key, with a nextUpdate `pki` would never write."""
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(next_update - dt.timedelta(days=2)).next_update(next_update)
           .sign(key, hashes.SHA256()))
    (d / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_a_site_revoked_while_running_is_refused_after_the_check_interval(pki):
    clock = Clock()
    v = Verifier(pki / "ca.crt", pki / "crl.pem", crl_check_s=5.0, clock=clock)
    h = _signed(pki)
    assert _reason(v, h) is None
    run = _fedsilo("pki", "revoke", "north", "--dir", str(pki))
    assert run.returncode == 0, run.stderr
    clock.t += 1.0
    assert _reason(v, h) is None  # not re-read on every message: at most every 5 s
    clock.t += 5.0
    assert _reason(v, h) == "signer_revoked"
    assert _reason(v, _signed(pki, "south"), "south") is None  # others unaffected
    assert v.problem is None


def test_a_stale_crl_refuses_every_signature_until_it_is_reissued(pki, caplog):
    clock = Clock()
    _write_crl(pki, dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    files = IdentityFiles(pki / "ca.crt", pki / "north.crt", pki / "north.key", pki / "crl.pem")
    trust = Trust.load(files, None, "north")  # starts (status can say why it refuses)
    assert trust is not None
    v = trust.verifier
    v._clock = clock  # the test's clock from here on
    h = _signed(pki, "south")
    with caplog.at_level(logging.ERROR, logger="agent.security.signing"):
        assert _reason(v, h, "south") == "crl_stale"
        assert _reason(v, h, "south") == "crl_stale"
    lines = [r.getMessage() for r in caplog.records if "nextUpdate" in r.getMessage()]
    assert len(lines) == 1 and str(pki / "crl.pem") in lines[0]  # one line, naming the file
    assert trust.problem == "crl_stale"
    run = _fedsilo("pki", "crl", "--dir", str(pki), "--days", "30")
    assert run.returncode == 0, run.stderr
    assert "crl.pem re-signed" in run.stdout
    clock.t += 10.0
    assert _reason(v, h, "south") is None
    assert trust.problem is None
    left = v.next_update - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < left <= dt.timedelta(days=30)


def test_reissuing_the_crl_keeps_its_revocations(pki):
    assert _fedsilo("pki", "revoke", "south", "--dir", str(pki)).returncode == 0
    assert _fedsilo("pki", "crl", "--dir", str(pki)).returncode == 0
    v = Verifier(pki / "ca.crt", pki / "crl.pem")
    assert _reason(v, _signed(pki, "south"), "south") == "signer_revoked"
    assert _reason(v, _signed(pki)) is None


def test_a_changed_crl_that_is_not_usable_keeps_the_previous_one(pki, tmp_path, caplog):
    clock = Clock()
    v = Verifier(pki / "ca.crt", pki / "crl.pem", crl_check_s=1.0, clock=clock)
    assert _fedsilo("pki", "revoke", "north", "--dir", str(pki)).returncode == 0
    good = (pki / "crl.pem").read_bytes()
    (pki / "crl.pem").write_bytes(good[: len(good) // 2])  # torn copy
    clock.t += 2.0
    with caplog.at_level(logging.ERROR, logger="agent.security.signing"):
        assert _reason(v, _signed(pki)) is None  # the previous CRL (north not on it) stays
    assert any("keeping the CRL loaded before" in r.getMessage() for r in caplog.records)
    other = tmp_path / "other"
    PKI.init(other, "fed")
    (pki / "crl.pem").write_bytes((other / "crl.pem").read_bytes())  # another CA's
    clock.t += 2.0
    assert _reason(v, _signed(pki)) is None
    (pki / "crl.pem").write_bytes(good)
    clock.t += 2.0
    assert _reason(v, _signed(pki)) == "signer_revoked"


def test_pki_crl_refuses_a_bad_validity_with_exit_2(pki):
    run = _fedsilo("pki", "crl", "--dir", str(pki), "--days", "0")
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "--days" in run.stderr


@pytest.mark.integration
def test_a_site_revoked_mid_federation_has_its_later_updates_refused(tmp_path, mosquitto):
    """Real site processes and a real coordinator: after round 1 the CA revokes south
    (`fedsilo pki revoke`); the running coordinator picks the new CRL up and refuses south's
    later updates as `signer_revoked`; the rounds go on with north."""
    from tests.fedharness import (
        CoordinatorThread,
        breast_cancer_sites,
        start_site,
        stop_all,
        write_site_config,
    )
    from tests.test_federation import FED, plan_for

    d = tmp_path / "pki"
    p = PKI.init(d, FED)
    for name in ("north", "south"):
        p.issue("site", name)
    p.issue("coordinator", "coordinator")
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    procs = []
    for name, table in zip(names, tables[:2], strict=True):
        ident = {"ca": str(d / "ca.crt"), "cert": str(d / f"{name}.crt"),
                 "key": str(d / f"{name}.key")}
        cfg = write_site_config(tmp_path / "sites", name, FED, mosquitto.port, table,
                                identity=ident)
        procs.append(start_site(cfg, tmp_path / f"{name}.log"))
    rounds: list[dict] = []
    coord: CoordinatorThread

    def on_round(record: dict) -> None:
        rounds.append(record)
        if len(rounds) == 1:
            run = _fedsilo("pki", "revoke", "south", "--dir", str(d))
            assert run.returncode == 0, run.stderr
            # What the next verification would do within CRL_CHECK_S, now (no race with
            # south's next upload).
            coord.coordinator.peer.trust.verifier.refresh(force=True)

    coord = CoordinatorThread(
        plan_for(features, names, rounds=3, min_sites=1, deadline=6.0), mosquitto.port,
        tmp_path / "coord", on_round=on_round,
        identity=IdentityFiles(d / "ca.crt", d / "coordinator.crt", d / "coordinator.key",
                               d / "crl.pem"))
    try:
        coord.start().join(timeout=180)
    finally:
        codes = stop_all(procs)
    assert codes == [0, 0]
    assert rounds[0]["sites"] == names
    assert [r["sites"] for r in rounds[1:]] == [["north"], ["north"]]
    assert coord.coordinator.peer.rejected["signer_revoked"] >= 1
    assert coord.coordinator.peer.trust.problem is None

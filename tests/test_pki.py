"""The federation PKI: what `fedsilo pki` writes, who it refuses, and what revocation does."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError
from agent.security.pki import PKI, days_left


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_issue_and_bundle(tmp_path):
    d = tmp_path / "pki"
    pki = PKI.init(d, "fed")
    assert mode(d) == 0o700 and mode(d / "ca.key") == 0o600
    ca = load(d / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role, identity in (("site", "north"), ("coordinator", "coordinator"),
                           ("monitor", "monitor")):
        issued = pki.issue(role, identity)
        cert = load(issued.cert)
        cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
        assert cert.subject.get_attributes_for_oid(
            NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert mode(issued.key) == 0o600 and issued.cert == d / f"{identity}.crt"
        bundle = d / f"bundle-{identity}"
        assert sorted(p.name for p in bundle.iterdir()) == sorted(
            ["ca.crt", f"{identity}.crt", f"{identity}.key"])
        assert mode(bundle) == 0o700 and mode(bundle / f"{identity}.key") == 0o600
    assert 364 < days_left(d / "north.crt") <= 365
    with pytest.raises(ConfigError, match="already exists"):
        PKI.init(d)


@pytest.mark.parametrize("site", ["North", "a/b", "+", "#", "", "-x", "x" * 33, "coordinator",
                                  "monitor", "broker", "north site"])
def test_site_ids_outside_the_protocol_pattern_are_refused(tmp_path, site):
    pki = PKI.init(tmp_path / "pki")
    with pytest.raises(ConfigError, match="site id"):
        pki.issue("site", site)
    assert not (tmp_path / "pki" / f"{site}.key").exists() or site == ""


def test_revocation_puts_every_certificate_of_an_identity_on_a_signed_crl(tmp_path):
    pki = PKI.init(tmp_path / "pki")
    first = load(pki.issue("site", "north").cert).serial_number
    second = load(pki.issue("site", "north").cert).serial_number  # re-issued
    kept = load(pki.issue("site", "south").cert).serial_number
    assert pki.revoke("north") == 2
    crl = x509.load_pem_x509_crl((tmp_path / "pki" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(load(tmp_path / "pki" / "ca.crt").public_key())
    revoked = {r.serial_number for r in crl}
    assert revoked == {first, second} and kept not in revoked
    assert crl.next_update_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=300)
    with pytest.raises(ConfigError, match="no certificate"):
        pki.revoke("east")


def test_cli_lists_expiry_with_a_warning_and_refuses_with_exit_2(tmp_path):
    d = tmp_path / "pki"

    def fedsilo(*args):
        return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                              text=True)

    assert fedsilo("pki", "init", "--dir", str(d)).returncode == 0
    assert fedsilo("pki", "issue", "site", "north", "--dir", str(d), "--days", "10"
                   ).returncode == 0
    assert fedsilo("pki", "issue", "coordinator", "--dir", str(d)).returncode == 0
    out = fedsilo("pki", "list", "--dir", str(d)).stdout
    assert "north" in out and "renew now" in out.split("north")[1].splitlines()[0]
    assert "renew now" not in out.split("coordinator")[1].splitlines()[0]
    bad = fedsilo("pki", "issue", "site", "Bad/Id", "--dir", str(d))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    again = fedsilo("pki", "init", "--dir", str(d))
    assert again.returncode == 2 and "refusing to replace" in again.stderr

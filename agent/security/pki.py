"""The federation's PKI: one CA, a key and certificate per identity, a CRL. No I/O beyond the
PKI directory; built on the `cryptography` library (X.509, CRL, ECDSA), never hand-rolled.

Choices (docs/security.md says why):
- ECDSA P-256 keys everywhere: every TLS stack a hospital broker runs (Mosquitto, EMQX,
  HiveMQ, VerneMQ) accepts them, signatures are small and verify in well under a millisecond.
- An identity is the certificate's common name: a site id (PROTOCOL.md's pattern), or the
  reserved names `coordinator` and `monitor` (IT's read-only watcher). The role is also written
  as the organisational unit, so a certificate says what it may do. The broker takes the
  common name as the MQTT username and client id.
- The directory holds `ca.crt`, `ca.key` (0600), `crl.pem` (always present, empty at first:
  the broker refuses every client if its CRL file is missing or expired, so it is re-signed on
  every issue and revoke, or by `fedsilo pki crl`, with a year's validity), `index.json`
  (what was issued, serials, expiry, revocations) and per identity `<id>.crt` / `<id>.key`
  (0600) and a bundle directory `bundle-<id>/` holding exactly what that host needs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError

SITE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
ROLES = ("site", "coordinator", "monitor", "broker")
RESERVED = {"coordinator", "monitor", "broker"}
CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 365
WARN_DAYS = 30  # status warns this many days before a certificate expires


@dataclass(frozen=True)
class Issued:
    identity: str
    role: str
    cert: Path
    key: Path
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Create with mode 0600 from the start (no window where the key is world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str, role: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


class PKI:
    """A PKI directory. `PKI.init` creates one; the constructor opens an existing one."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        where = str(self.dir)
        if not (self.dir / "ca.crt").is_file() or not (self.dir / "ca.key").is_file():
            raise ConfigError(where, "", "not a PKI directory (no ca.crt / ca.key; run "
                                         "`fedsilo pki init --dir` first)")
        self.ca_cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(where, "ca.key", "not an EC private key")
        self.ca_key = key
        self.index = json.loads((self.dir / "index.json").read_text())
        self.federation: str | None = self.index.get("federation")

    # ------------------------------------------------------------------ creation

    @classmethod
    def init(cls, directory: Path, federation: str | None = None, *,
             days: int = CA_DAYS) -> PKI:
        """A new CA in `directory` (refused if one is there: overwriting it would orphan
        every certificate already handed out). With `federation`, broker configs made from it
        must be for that federation."""
        d = Path(directory)
        if federation is not None and not SITE_ID.match(federation):
            raise ConfigError("fedsilo pki init", "--federation",
                              f"{federation!r} must match {SITE_ID.pattern}")
        if (d / "ca.key").exists():
            raise ConfigError(str(d), "ca.key", "a CA already exists here; refusing to replace "
                                                "it")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"fedsilo CA {federation or ''}".strip(), "ca")
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(d / "ca.key", _key_pem(key))
        _write_public(d / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write_public(d / "index.json", json.dumps({"federation": federation, "issued": {}},
                                                   indent=1).encode())
        pki = cls(d)
        pki._write_crl()
        return pki

    def issue(self, role: str, identity: str, *, days: int = LEAF_DAYS,
              hosts: tuple[str, ...] = (), not_before: dt.datetime | None = None
              ) -> Issued:
        """Key and certificate for one identity (re-issuing replaces the old pair; revoke the
        old one if it may have leaked). `hosts`: DNS names / IPs a broker certificate serves."""
        if role not in ROLES:
            raise ConfigError("fedsilo pki issue", "role", f"{role!r} is not one of "
                                                           f"{', '.join(ROLES)}")
        if role == "site":
            if not SITE_ID.match(identity) or identity in RESERVED:
                raise ConfigError("fedsilo pki issue", "site id",
                                  f"{identity!r} must match {SITE_ID.pattern} and not be one "
                                  f"of {', '.join(sorted(RESERVED))}")
        elif identity != role:
            raise ConfigError("fedsilo pki issue", role, f"the {role} identity is named {role!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - dt.timedelta(minutes=5)
        end = start + dt.timedelta(days=days)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(identity, role))
                   .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.ca_key.public_key()), critical=False))
        if role == "broker":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_general_name(h) for h in hosts or ("localhost", "127.0.0.1")]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{identity}.crt", self.dir / f"{identity}.key"
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        entry = self.index["issued"].setdefault(identity, {"role": role, "serials": []})
        entry["serials"].append(format(cert.serial_number, "x"))
        entry["current"] = format(cert.serial_number, "x")
        entry["not_after"] = end.isoformat()
        self._save_index()
        if role != "broker":
            self._bundle(identity)
        return Issued(identity, role, cert_path, key_path, end)

    def revoke(self, identity: str) -> int:
        """Put every certificate ever issued to `identity` on the CRL; returns how many."""
        entry = self.index["issued"].get(identity)
        if entry is None:
            raise ConfigError(str(self.dir), identity, "no certificate was issued to this "
                                                      "identity")
        revoked = self.index.setdefault("revoked", {})
        for serial in entry["serials"]:
            revoked.setdefault(serial, _now().isoformat())
        self._save_index()
        self._write_crl()
        return len(entry["serials"])

    def reissue_crl(self, days: int = CRL_DAYS) -> dt.datetime:
        """Re-sign the CRL (same revocations) valid for `days` more; returns its nextUpdate.
        For a CRL near or past its nextUpdate: agents refuse every signature (`crl_stale`)
        and the broker every client once it has passed."""
        if days < 1:
            raise ConfigError("fedsilo pki crl", "--days", "must be at least 1")
        return self._write_crl(days)

    # ------------------------------------------------------------------ internals

    def _save_index(self) -> None:
        _write_public(self.dir / "index.json", json.dumps(self.index, indent=1).encode())

    def _write_crl(self, days: int = CRL_DAYS) -> dt.datetime:
        now = _now()
        next_update = now + dt.timedelta(days=days)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(next_update))
        for serial, when in self.index.get("revoked", {}).items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromisoformat(when)).build())
        crl = builder.sign(self.ca_key, hashes.SHA256())
        _write_public(self.dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        return next_update

    def _bundle(self, identity: str) -> None:
        """`bundle-<id>/`: what one host needs (CA certificate, its certificate and key), so
        IT copies one directory; the key stays 0600 and the directory 0700."""
        b = self.dir / f"bundle-{identity}"
        b.mkdir(exist_ok=True)
        os.chmod(b, 0o700)
        shutil.copyfile(self.dir / "ca.crt", b / "ca.crt")
        shutil.copyfile(self.dir / f"{identity}.crt", b / f"{identity}.crt")
        _write_private(b / f"{identity}.key", (self.dir / f"{identity}.key").read_bytes())


def _general_name(host: str) -> x509.GeneralName:
    import ipaddress

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def days_left(cert_path: Path, now: dt.datetime | None = None) -> float:
    """Days until the certificate at `cert_path` expires (negative once it has)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return (cert.not_valid_after_utc - (now or _now())).total_seconds() / 86400

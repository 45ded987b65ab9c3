"""Up-front checks of an identity's files (CA, certificate, key, CRL) with `cryptography`.

Why: a wrong file otherwise passes `fedsilo config check` and fails much later (at TLS
connect, at the first signature, or silently: peers refuse our messages). Each check raises a
`ConfigError` naming the config file, the key, the file at fault and what is wrong with it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import ConfigError

Where = tuple[str, str]  # (config file, dotted key) a problem is reported under


def _fail(where: Where | None, path: Path, problem: str) -> ConfigError:
    """Under the config key that named `path`; without one (`Signer`), under the file itself."""
    if where is None:
        return ConfigError(str(path), "identity", problem)
    return ConfigError(where[0], where[1], f"{path}: {problem}")


def _read(path: Path, where: Where | None) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _fail(where, path, f"cannot be read ({exc.strerror or exc})") from None


def load_certificate(path: Path, where: Where | None = None) -> x509.Certificate:
    """A PEM certificate, or a ConfigError naming `path`."""
    try:
        return x509.load_pem_x509_certificate(_read(path, where))
    except ValueError:
        raise _fail(where, path, "not a PEM X.509 certificate") from None


def load_private_key(path: Path, where: Where | None = None) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key, or a ConfigError naming `path` (the key file)."""
    try:
        key = serialization.load_pem_private_key(_read(path, where), None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise _fail(where, path, "private key is encrypted; fedsilo needs it unencrypted "
                                 "(protect it with file mode 0600 instead)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _fail(where, path, "not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise _fail(where, path, "not an EC private key (fedsilo uses ECDSA P-256)")
    return key


def key_matches(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    pub = cert.public_key()
    return isinstance(pub, ec.EllipticCurvePublicKey) and \
        pub.public_numbers() == key.public_key().public_numbers()


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def check_pair(config: str, table: str, cert_path: Path, key_path: Path) -> x509.Certificate:
    """Certificate and key both load and belong together (what TLS needs)."""
    cert = load_certificate(cert_path, (config, f"{table}.cert"))
    key = load_private_key(key_path, (config, f"{table}.key"))
    if not key_matches(cert, key):
        raise _fail((config, f"{table}.key"), key_path,
                    f"does not match the certificate {cert_path} (another identity's key?)")
    return cert


def check_identity(config: str, table: str, ca_path: Path, cert_path: Path, key_path: Path,
                   crl_path: Path | None, identity: str, role: str,
                   now: dt.datetime | None = None) -> None:
    """Everything peers will check about our signatures, checked before we send any: the
    certificate is this process's identity and role, issued by the configured CA, valid now
    and not revoked, and the key is its key."""
    cert = check_pair(config, table, cert_path, key_path)
    ca = load_certificate(ca_path, (config, f"{table}.ca"))
    where = (config, f"{table}.cert")
    name, unit = _attr(cert, NameOID.COMMON_NAME), _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if name != identity:
        raise _fail(where, cert_path, f"certificate is for {name!r}, this process is "
                                      f"{identity!r}")
    if unit != role:
        raise _fail(where, cert_path, f"certificate is a {unit!r} identity, this process is a "
                                      f"{role}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise _fail(where, cert_path, f"not issued by the CA in {ca_path} (another federation's "
                                      f"certificate, or the wrong ca file?)") from None
    moment = now or dt.datetime.now(dt.timezone.utc)
    if moment < cert.not_valid_before_utc:
        raise _fail(where, cert_path, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
                                      f" UTC (check this host's clock)")
    if moment > cert.not_valid_after_utc:
        raise _fail(where, cert_path, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue a "
                                      f"new one (fedsilo pki issue)")
    if crl_path is not None:
        crl_where = (config, f"{table}.crl")
        try:
            crl = x509.load_pem_x509_crl(_read(crl_path, crl_where))
        except ValueError:
            raise _fail(crl_where, crl_path, "not a PEM certificate revocation list") from None
        if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise _fail(crl_where, crl_path, f"not signed by the CA in {ca_path}")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise _fail(where, cert_path, f"certificate is revoked in {crl_path}")

"""Signed manifests: who sent a body is proven by the sender's key, not by where it came from.

A manifest names its body completely (every chunk's SHA-256 and the whole body's), so signing
the manifest signs the body. Resend requests are signed the same way: a broker cannot forge
one (it can replay a genuine one, which resends only the chunks that request named). The
sender adds two header fields: `cert` (its certificate, DER, base64) and `sig` (ECDSA P-256
over SHA-256 of the canonical header: sorted-key compact JSON of every field but `sig`). The
receiver checks, before the message is used at all:

- the certificate was issued by the federation CA, is within its validity, is not on the CRL;
- its common name is the sender the topic names, and its role (the certificate's OU) is the
  topic's: `coordinator` for coordinator topics, `site` for a site's;
- the signature verifies.

The federation, round and freshness (a nonce never seen for that round) are then checked by
the roles as before; since they are inside the signed header, neither a broker nor anyone on
the network can change them. Certificates already verified are cached by their bytes.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import ConfigError, ProtocolError
from agent.security.identity import key_matches, load_certificate, load_private_key

log = logging.getLogger(__name__)

MAX_CERT_B64 = 4096  # a P-256 certificate is ~600 bytes; anything far larger is refused


def canonical(header: dict[str, Any]) -> bytes:
    """The bytes a signature covers: every header field but `sig`, sorted, compact."""
    return json.dumps({k: v for k, v in header.items() if k != "sig"}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False).encode()


class Signer:
    """This process's identity: the key that signs its manifests and the certificate sent
    with them (the same files as its TLS client identity)."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        cert = load_certificate(Path(cert_path))  # each names its own file when unusable
        key = load_private_key(Path(key_path))
        if not key_matches(cert, key):
            raise ConfigError(str(cert_path), "identity", "certificate and key do not match")
        self.key = key
        self.name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.cert_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def sign(self, header: dict[str, Any]) -> dict[str, Any]:
        signed = {**header, "cert": self.cert_b64}
        sig = self.key.sign(canonical(signed), ec.ECDSA(hashes.SHA256()))
        signed["sig"] = base64.b64encode(sig).decode()
        return signed


@dataclass(frozen=True)
class _Known:
    name: str
    role: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    public_key: ec.EllipticCurvePublicKey


CRL_CHECK_S = 5.0  # how often the CRL file's stat is looked at (never per message)


class Verifier:
    """Trust in the federation CA (and its CRL): checks the signature on a manifest header.

    The CRL file is watched: at most every `crl_check_s` seconds (on the receiving path, or
    through `refresh()`) its inode, size and mtime are compared and a changed file is read
    again, so a revocation takes effect without a restart. A CRL past its nextUpdate fails
    closed: every peer signature is refused as `crl_stale` (and `problem` says so) until the
    CA operator re-signs it (`fedsilo pki crl`). A changed file that cannot be used (torn,
    not signed by the CA) is logged and the previous CRL kept."""

    def __init__(self, ca_path: Path, crl_path: Path | None = None, *,
                 crl_check_s: float = CRL_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            self.ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(str(ca_path), "identity", f"cannot load CA / CRL: {exc}") from None
        self.crl_path = Path(crl_path) if crl_path else None
        self.revoked: set[int] = set()
        self.next_update: dt.datetime | None = None
        self._crl_check_s = crl_check_s
        self._clock = clock
        self._crl_stat: tuple[int, int, int] | None = None
        self._checked_at = clock()
        self._stale_logged: dt.datetime | None = None
        if self.crl_path is not None:
            self._load_crl(self._stat())
        self._known: dict[bytes, _Known] = {}

    def _stat(self) -> tuple[int, int, int]:
        assert self.crl_path is not None
        try:
            st = self.crl_path.stat()
        except OSError as exc:
            raise ConfigError(str(self.crl_path), "identity",
                              f"cannot load CA / CRL: {exc}") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load_crl(self, stat: tuple[int, int, int]) -> None:
        """Read and check the CRL file; ConfigError naming it when it is not usable."""
        assert self.crl_path is not None
        where = str(self.crl_path)
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(where, "identity", f"cannot load CA / CRL: {exc}") from None
        if not crl.is_signature_valid(self.ca.public_key()):
            raise ConfigError(where, "identity", "CRL not signed by the federation CA")
        self.revoked = {r.serial_number for r in crl}
        self.next_update = crl.next_update_utc
        self._crl_stat = stat
        self._stale_logged = None

    def refresh(self, *, force: bool = False) -> None:
        """Reload the CRL if its file changed; cheap (a clock read) between checks."""
        if self.crl_path is None:
            return
        now = self._clock()
        if not force and now - self._checked_at < self._crl_check_s:
            return
        self._checked_at = now
        try:
            stat = self._stat()
            if stat != self._crl_stat:
                self._load_crl(stat)
                log.info("CRL %s reloaded: %d revoked, next update %s", self.crl_path,
                         len(self.revoked), self.next_update)
        except ConfigError as exc:
            log.error("%s; keeping the CRL loaded before", exc)
            try:
                self._crl_stat = self._stat()  # logged once per change, not every check
            except ConfigError:
                pass

    def crl_stale(self, moment: dt.datetime | None = None) -> bool:
        """True once the loaded CRL is past its nextUpdate (a CRL without one never is)."""
        moment = moment or dt.datetime.now(dt.timezone.utc)
        return self.next_update is not None and moment > self.next_update

    @property
    def problem(self) -> str | None:
        """What stops every verification now (`crl_stale`), for the roles' status; or None."""
        self.refresh()
        return "crl_stale" if self.crl_stale() else None

    def verify(self, header: dict[str, Any], *, sender: str, role: str,
               now: dt.datetime | None = None) -> None:
        cert_b64, sig_b64 = header.get("cert"), header.get("sig")
        if not isinstance(cert_b64, str) or not isinstance(sig_b64, str):
            raise ProtocolError("unsigned", "message carries no signature")
        if len(cert_b64) > MAX_CERT_B64 or len(sig_b64) > 256:
            raise ProtocolError("bad_signature", "signature fields too large")
        self.refresh()
        moment = now or dt.datetime.now(dt.timezone.utc)
        if self.crl_stale(moment):
            if self._stale_logged != self.next_update:
                self._stale_logged = self.next_update
                log.error("CRL %s expired at %s (its nextUpdate): every peer signature is "
                          "refused until the CA re-signs it (fedsilo pki crl) and it is copied "
                          "here", self.crl_path, self.next_update)
            raise ProtocolError("crl_stale", f"CRL {self.crl_path} past its nextUpdate "
                                             f"{self.next_update}")
        known = self._signer(cert_b64)
        if not known.not_before <= moment <= known.not_after:
            raise ProtocolError("signer_expired", known.name)
        if known.serial in self.revoked:
            raise ProtocolError("signer_revoked", known.name)
        if known.name != sender or known.role != role:
            raise ProtocolError("signer_mismatch", f"signed by {known.role} {known.name!r}, "
                                                   f"sent as {role} {sender!r}")
        try:
            sig = base64.b64decode(sig_b64, validate=True)
            if base64.b64encode(sig).decode() != sig_b64:  # one spelling per signature
                raise ValueError("non-canonical base64")
            known.public_key.verify(sig, canonical(header), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            raise ProtocolError("bad_signature", known.name) from None

    def _signer(self, cert_b64: str) -> _Known:
        key = hashlib.sha256(cert_b64.encode()).digest()
        known = self._known.get(key)
        if known is not None:
            return known
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(cert_b64, validate=True))
            cert.verify_directly_issued_by(self.ca)
            name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            role = cert.subject.get_attributes_for_oid(
                NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
            public_key = cert.public_key()
        except (InvalidSignature, binascii.Error, ValueError, TypeError, IndexError):
            raise ProtocolError("untrusted_signer", "certificate not issued by the "
                                                    "federation CA") from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ProtocolError("untrusted_signer", "not an EC key")
        known = _Known(str(name), str(role), cert.serial_number, cert.not_valid_before_utc,
                       cert.not_valid_after_utc, public_key)
        if len(self._known) < 10_000:  # a bound, though only CA-issued certificates get here
            self._known[key] = known
        return known

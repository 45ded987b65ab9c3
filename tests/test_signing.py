"""Manifest signatures: what a receiver accepts, and the reason it gives for what it does not."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from agent.config import IdentityFiles
from agent.errors import ConfigError, ProtocolError
from agent.federation.envelope import BodyKind, make_manifest
from agent.federation.peer import Trust
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("sig") / "pki"
    p = PKI.init(d, "fed")
    for site in ("north", "south", "gone"):
        p.issue("site", site)
    p.issue("coordinator", "coordinator")
    then = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    p.issue("site", "old", not_before=then, days=365)
    p.revoke("gone")
    other = PKI.init(d.parent / "other", "fed")
    other.issue("site", "north")
    return p


def header(sender="north", rnd=3):
    m = make_manifest(federation="fed", round=rnd, sender=sender, body_kind=BodyKind.UPDATE,
                      body=b"\x01" * 3000, created=1.5e9, meta={"n_samples": 40, "x": 0.1})
    return m.header()


def signer(pki, name, base=None):
    d = base or pki.dir
    return Signer(d / f"{name}.crt", d / f"{name}.key")


def over_the_wire(h):
    return json.loads(json.dumps(h, sort_keys=True, separators=(",", ":")))


def test_a_signed_manifest_verifies_after_the_wire(pki):
    v = Verifier(pki.dir / "ca.crt", pki.dir / "crl.pem")
    v.verify(over_the_wire(signer(pki, "north").sign(header())), sender="north", role="site")
    v.verify(over_the_wire(signer(pki, "coordinator").sign(header("coordinator"))),
             sender="coordinator", role="coordinator")


@pytest.mark.parametrize("case,reason", [
    ("unsigned", "unsigned"),
    ("round changed", "bad_signature"),
    ("meta changed", "bad_signature"),
    ("digest changed", "bad_signature"),
    ("signature garbled", "bad_signature"),
    ("signature of another manifest", "bad_signature"),
    ("another CA", "untrusted_signer"),
    ("certificate garbled", "untrusted_signer"),
    ("expired", "signer_expired"),
    ("revoked", "signer_revoked"),
    ("south signs as north", "signer_mismatch"),
    ("site signs as coordinator", "signer_mismatch"),
    ("huge certificate", "bad_signature"),
])
def test_refused_with_a_reason(pki, case, reason):
    v = Verifier(pki.dir / "ca.crt", pki.dir / "crl.pem")
    sender, role = "north", "site"
    h = signer(pki, "north").sign(header())
    if case == "unsigned":
        h = header()
    elif case == "round changed":
        h["round"] = 4  # a replay into a later round
    elif case == "meta changed":
        h["meta"]["n_samples"] = 40_000  # inflating one's weight
    elif case == "digest changed":
        h["body_digest"] = "0" * 64
    elif case == "signature garbled":
        h["sig"] = "not base64!"
    elif case == "signature of another manifest":
        h["sig"] = signer(pki, "north").sign(header(rnd=9))["sig"]
    elif case == "another CA":
        h = signer(pki, "north", pki.dir.parent / "other").sign(header())
    elif case == "certificate garbled":
        h["cert"] = h["cert"][:50]
    elif case == "expired":
        h = signer(pki, "old").sign(header("old"))
        sender = "old"
    elif case == "revoked":
        h = signer(pki, "gone").sign(header("gone"))
        sender = "gone"
    elif case == "south signs as north":
        h = signer(pki, "south").sign(header())
    elif case == "site signs as coordinator":
        h = signer(pki, "north").sign(header("coordinator"))
        sender, role = "coordinator", "coordinator"
    elif case == "huge certificate":
        h["cert"] = "A" * 100_000
    with pytest.raises(ProtocolError) as info:
        v.verify(over_the_wire(h), sender=sender, role=role)
    assert info.value.reason == reason


def test_trust_refuses_a_certificate_of_someone_else_with_a_config_error(pki):
    files = IdentityFiles(pki.dir / "ca.crt", pki.dir / "north.crt", pki.dir / "north.key")
    assert Trust.load(files, None, "north").signer.name == "north"
    assert Trust.load(None, None, "north") is None
    with pytest.raises(ConfigError, match="certificate is for 'north'"):
        Trust.load(files, None, "south")
    with pytest.raises(ConfigError, match="do not match"):
        Signer(pki.dir / "north.crt", pki.dir / "south.key")

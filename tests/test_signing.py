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


def test_resend_requests_are_answered_only_when_signed_by_the_site_the_topic_names(pki):
    """A resend request makes the coordinator publish a body's chunks again: unsigned, or
    signed by anyone but the site on whose topic it came, it is refused and nothing is sent.
    The requesting side signs its own requests."""
    from agent.federation import envelope, topics
    from agent.federation.peer import Peer
    from tests.test_fuzz import RecordingTransport

    def peer(name):
        t = RecordingTransport()
        me = Trust(signer(pki, name), Verifier(pki.dir / "ca.crt", pki.dir / "crl.pem"))
        return t, Peer(t, "fed", name, max_body=1 << 20, accept=lambda _t: True, trust=me)

    out, coordinator = peer("coordinator")
    body = bytes(range(256)) * 20
    m = make_manifest(federation="fed", round=3, sender="coordinator", body_kind=BodyKind.TASK,
                      body=body, created=1.5e9, meta={}, chunk_size=1000)
    coordinator.send_body(topics.coordinator_manifest("fed", 3),
                          lambda i: topics.coordinator_chunk("fed", 3, i), m, body)
    out.published.clear()
    ask = envelope.resend_header(federation="fed", round=3, sender="north",
                                 body_digest=m.body_digest, missing=[1, 4])
    req = topics.site_req("fed", "north")
    for forged, reason in ((ask, "unsigned"), (signer(pki, "south").sign(ask), "signer_mismatch"),
                           (signer(pki, "north", pki.dir.parent / "other").sign(ask),
                            "untrusted_signer")):
        assert coordinator._handle(req, envelope.encode(forged)) is None
        assert coordinator.rejected[reason] == 1 and out.published == []
    coordinator._handle(req, envelope.encode(signer(pki, "north").sign(ask)))
    assert [t for t, _n in out.published] == [topics.coordinator_chunk("fed", 3, i)
                                              for i in (1, 4)]
    # north's own requests, when chunks stop arriving, carry north's signature
    sent, north = peer("north")
    north.reassembler.add_manifest(m, 0.0)
    north.request_missing(lambda _m: req)
    (topic, payload), = sent.payloads
    assert topic == req
    Verifier(pki.dir / "ca.crt").verify(envelope.decode(payload, max_body=0).header,
                                        sender="north", role="site")

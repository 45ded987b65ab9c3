"""Hostile input: 12,000 seeded mutations of valid signed messages into the receiving path
(`Peer`: envelope decoding, signature and manifest checks, reassembly). Zero crashes, none
slower than 1 s, every one refused with a reason (or, for a chunk whose header no longer names
a known manifest, parked within its budget like any early chunk), nothing taken into the
genuine body, and nothing left behind once the round is over."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from agent.federation import envelope, topics
from agent.federation.envelope import BodyKind, make_manifest
from agent.federation.peer import Peer, Trust
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier

FED = "fuzz"
N_MUTANTS = 12_000


@dataclass
class RecordingTransport:
    """The transport a Peer answers resend requests through (nothing is sent anywhere)."""

    published: list[tuple[str, int]] = field(default_factory=list)
    payloads: list[tuple[str, bytes]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, **_kw):
        self.published.append((topic, len(payload)))
        self.payloads.append((topic, payload))
        return None

    def wait_published(self, infos, timeout_s: float) -> None:
        return None


@pytest.fixture(scope="module")
def trust(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "pki"
    pki = PKI.init(d, FED)
    pki.issue("site", "north")
    pki.issue("coordinator", "coordinator")
    return (Trust(Signer(d / "coordinator.crt", d / "coordinator.key"),
                  Verifier(d / "ca.crt", d / "crl.pem")),
            Signer(d / "north.crt", d / "north.key"))


def valid_messages(north: Signer) -> list[tuple[str, bytes]]:
    body = bytes(random.Random(1).randbytes(2500))
    m = make_manifest(federation=FED, round=3, sender="north", body_kind=BodyKind.UPDATE,
                      body=body, created=1.7e9, meta={"n_samples": 40, "update": {"codec": 2}},
                      chunk_size=1000)
    out = [(topics.site_manifest(FED, "north", 3), envelope.encode(north.sign(m.header())))]
    out += [(topics.site_chunk(FED, "north", 3, i), payload)
            for i, payload in envelope.iter_chunks(m, body)]
    out.append((topics.site_req(FED, "north"), envelope.encode(north.sign(envelope.resend_header(
        federation=FED, round=3, sender="north", body_digest=m.body_digest, missing=[0, 2])))))
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        at = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip one bit
            b[min(at, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # any byte
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 2:  # cut
            del b[at:]
        elif op == 3:  # insert
            b[at:at] = rng.randbytes(rng.randint(1, 40))
        elif op == 4:  # delete a run
            del b[at:at + rng.randint(1, 40)]
        elif op == 5:  # repeat a run
            b[at:at] = b[at:at + rng.randint(1, 200)]
        else:  # a header value swapped for another JSON value
            b = bytearray(_swap_header_value(rng, bytes(b)))
    return bytes(b)


def _swap_header_value(rng: random.Random, data: bytes) -> bytes:
    try:
        env = envelope.decode(data, max_body=10**7)
    except Exception:  # noqa: BLE001 - already broken: leave it so
        return data
    h = dict(env.header)
    key = rng.choice(sorted(h))
    h[key] = rng.choice([None, True, -1, 0, 2**40, 1e308, "", "x" * 300, [], {}, [0] * 50,
                         "north", "coordinator", FED, "0" * 64, {"a": [1, {"b": None}]}])
    raw = json.dumps(h, separators=(",", ":"), allow_nan=False).encode()
    return envelope._PREFIX.pack(envelope.MAGIC, 1, 0, len(raw)) + raw + env.body


def test_mutated_messages_are_refused_with_reasons_and_leave_nothing(trust):
    coordinator_trust, north = trust
    transport = RecordingTransport()
    peer = Peer(transport, FED, "coordinator", max_body=1 << 20,
                accept=lambda t: t.sender == "north" and (t.round in (None, 3)),
                trust=coordinator_trust)
    valid = valid_messages(north)
    # The genuine manifest is in, so every chunk can be checked against it; its chunks never
    # come, only mutants of them and of everything else.
    assert peer._handle(*valid[0]) is None and peer.reassembler.pending_count() == 1
    [pending] = peer.reassembler._pending.values()
    rng = random.Random(20261128)
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    for _ in range(N_MUTANTS):
        topic, payload = rng.choice(valid)
        bad = mutate(rng, payload)
        if bad == payload:
            continue
        before_rejected = sum(peer.rejected.values())
        before_orphans = peer.reassembler._orphan_bytes
        t = time.perf_counter()
        event = peer._handle(topic, bad)  # anything but a ProtocolError would escape: a crash
        slowest = max(slowest, time.perf_counter() - t)
        assert event is None
        if not bad:
            outcomes["empty (what clearing a retained message looks like)"] += 1
        elif sum(peer.rejected.values()) == before_rejected + 1:
            outcomes["refused"] += 1
        elif peer.reassembler._orphan_bytes > before_orphans:
            outcomes["chunk parked until its manifest comes"] += 1
        else:
            outcomes["no-op (a chunk already parked)"] += 1
            assert "/chunk/" in topic
        # no forged manifest was taken, no mutated chunk was taken into the genuine body
        assert peer.reassembler.pending_count() == 1 and not pending.have
    assert slowest < 1.0
    assert sum(outcomes.values()) >= 10_000
    assert outcomes["refused"] >= 0.8 * sum(outcomes.values()), outcomes
    assert transport.published == []  # no mutated resend request made us send anything
    reasons = set(peer.rejected)
    assert {"bad_signature", "bad_magic", "bad_header_json", "chunk_digest_mismatch",
            "resend_unknown_body"} <= reasons, peer.rejected
    peer.reassembler.forget_rounds_before(10**9)
    assert peer.reassembler.pending_count() == 0 and peer.reassembler._orphan_bytes == 0

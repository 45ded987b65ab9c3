"""Hostile input: 12,000 seeded mutations of valid signed messages into the receiving path
(`Peer`: envelope decoding, signature and manifest checks, reassembly). Zero crashes, none
slower than 1 s, every one refused with a reason (or, for a chunk whose header no longer names
a known manifest, parked within its budget like any early chunk), nothing taken into the
genuine body, and nothing left behind once the round is over."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest

from agent.federation import envelope, topics
from agent.federation.envelope import BodyKind, make_manifest
from agent.federation.peer import Peer, Trust
from agent.security.pki import PKI
from agent.security.signing import Signer, Verifier
from tests.fedharness import CoordinatorThread, breast_cancer_sites, start_site, stop_all
from tests.test_federation import FED as BC
from tests.test_federation import launch, plan_for

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


HOSTILE_LEVELS = ["²", "１", "①", "١", "99999999999999999999", " 1", "+1", "1_0", "", "+", "#",
                  "\x00", "x" * 70_000]


def hostile_topics(sender: str) -> list[str]:
    if sender == "coordinator":
        forms = [f"fedsilo/v1/{FED}/coordinator/round/{{}}/manifest",
                 f"fedsilo/v1/{FED}/coordinator/round/3/chunk/{{}}"]
    else:
        forms = [f"fedsilo/v1/{FED}/site/{sender}/update/{{}}/manifest",
                 f"fedsilo/v1/{FED}/site/{sender}/update/{{}}/chunk/0",
                 f"fedsilo/v1/{FED}/site/{sender}/update/3/chunk/{{}}"]
    return [form.format(level) for form in forms for level in HOSTILE_LEVELS]


def test_hostile_topics_are_refused_by_name_before_the_payload_is_read(trust, caplog):
    coordinator_trust, north = trust
    peer = Peer(RecordingTransport(), FED, "coordinator", max_body=1 << 20,
                accept=lambda t: t.sender == "north", trust=coordinator_trust)
    genuine = valid_messages(north)[0][1]  # would be taken on the right topic
    names = hostile_topics("north") + [f"fedsilo/v1/{FED}/site/north/update/3/manifest/x",
                                       f"fedsilo/v1/{FED}/site/north/update"]
    for name in names:
        assert peer._handle(name, genuine) is None
    assert peer.rejected == Counter({"bad_topic": len(names)})
    assert peer.reassembler.pending_count() == 0 and peer.bytes_received == 0
    lines = [r.getMessage() for r in caplog.records if "dropped message on" in r.getMessage()]
    assert len(lines) == len(names) and all(line.endswith(": bad_topic") for line in lines)
    assert max(len(line) for line in lines) < 300  # the topic is cut at 200 characters
    assert peer._handle(topics.site_manifest(FED, "north", 3), genuine) is None
    assert peer.reassembler.pending_count() == 1  # the same bytes, on their own topic


class _Stop(BaseException):
    """Like the site's _Stopping: a stop request, not a bad message."""


@pytest.mark.parametrize("error", [ValueError("x"), KeyError("k"), TypeError("t"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
                                   OverflowError("o"), RecursionError("r"), IndexError("i"),
                                   AttributeError("a"), ZeroDivisionError("z")])
def test_any_error_while_handling_one_message_is_a_counted_rejection(trust, caplog, error):
    coordinator_trust, north = trust

    def accept(_topic):
        raise error

    peer = Peer(RecordingTransport(), FED, "coordinator", max_body=1 << 20, accept=accept,
                trust=coordinator_trust)
    topic, payload = valid_messages(north)[0]
    assert peer._handle(topic, payload) is None
    assert peer.rejected == Counter({"malformed": 1})
    [line] = [r.getMessage() for r in caplog.records if "dropped message on" in r.getMessage()]
    assert type(error).__name__ in line and topic in line


@pytest.mark.parametrize("stop", [_Stop(), KeyboardInterrupt()])
def test_a_stop_request_raised_while_handling_is_not_swallowed(trust, stop):
    coordinator_trust, north = trust

    def accept(_topic):
        raise stop

    peer = Peer(RecordingTransport(), FED, "coordinator", max_body=1 << 20, accept=accept,
                trust=coordinator_trust)
    with pytest.raises(type(stop)):
        peer._handle(*valid_messages(north)[0])


@pytest.mark.integration
def test_hostile_topic_numbers_over_mqtt_end_no_process(tmp_path, mosquitto):
    """Real Mosquitto, real site processes, the real coordinator: '²', '１', '①' and a
    20-digit number in the round and chunk levels of every topic the roles subscribe to, live
    and retained (what a restarting process receives first). Before topics were parsed
    strictly, the first of them ended the coordinator (ValueError from int('²')) and the
    retained one ended every site on every start."""
    tables, _test, features = breast_cancer_sites(tmp_path / "data")
    names = ["north", "south"]
    root = f"fedsilo/v1/{BC}"
    levels = ["²", "１", "①", "١", "99999999999999999999", "9" * 3000]
    retained = [f"{root}/coordinator/round/{x}/manifest" for x in levels] + \
        [f"{root}/site/north/update/{x}/manifest" for x in levels]
    forged = envelope.encode({"kind": "manifest", "federation": BC, "round": 1})
    vandal = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="vandal")
    vandal.connect("127.0.0.1", mosquitto.port)
    vandal.loop_start()
    for topic in retained:
        vandal.publish(topic, forged, qos=1, retain=True).wait_for_publish(5)

    procs = launch(tmp_path, mosquitto.port, names, tables[:2])
    coord = CoordinatorThread(plan_for(features, names, rounds=3), mosquitto.port,
                              tmp_path / "coord").start()
    stop, sent = threading.Event(), [0]

    def keep_publishing():
        while not stop.is_set():
            rnd = coord.coordinator.current_round
            live = [f"{root}/site/{s}/update/{x}/manifest" for s in names for x in levels]
            live += [f"{root}/site/south/update/{rnd}/chunk/{x}" for x in levels]
            live += [f"{root}/site/north/update/{x}/chunk/0" for x in levels]
            live += [f"{root}/coordinator/round/{x}/chunk/0" for x in levels]
            live += [f"{root}/coordinator/round/{rnd}/chunk/{x}" for x in levels]
            for topic in live:
                vandal.publish(topic, forged, qos=1)
                sent[0] += 1
            time.sleep(0.1)

    t = threading.Thread(target=keep_publishing, daemon=True)
    t.start()
    try:
        final = coord.join(timeout=180)  # re-raises what ended the coordinator's thread
    finally:
        stop.set()
        t.join(5)
    assert stop_all(procs) == [0, 0]
    assert final["sites"] == names and sent[0] > 100
    assert coord.coordinator.peer.rejected["bad_topic"] >= 2 * len(levels), \
        coord.coordinator.peer.rejected
    for name in names:
        log = (tmp_path / f"{name}.log").read_text()
        assert "bad_topic" in log and "Traceback" not in log
    # North started again while the hostile manifests are still retained: it drops them, reads
    # that the run it took part in is over and waits for a new one (before: a traceback on
    # every start); SIGTERM ends it cleanly.
    cfg = tmp_path / "sites" / "north.toml"
    again_log = tmp_path / "north-again.log"
    again = start_site(cfg, again_log)
    deadline = time.monotonic() + 60
    while "waiting for a new run" not in again_log.read_text() and time.monotonic() < deadline:
        assert again.poll() is None, again_log.read_text()[-2000:]
        time.sleep(0.1)
    again.send_signal(signal.SIGTERM)
    assert again.wait(30) == 0
    log = again_log.read_text()
    assert log.count("bad_topic") >= len(levels)
    assert "finished earlier; waiting for a new run" in log and "Traceback" not in log
    for topic in retained:
        vandal.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    vandal.loop_stop()
    vandal.disconnect()


@pytest.mark.integration
def test_fedsilo_status_skips_hostile_retained_status_and_shows_the_rest(mosquitto):
    """Anyone who could publish once leaves these retained for every `fedsilo status`: before,
    each one ended the command with a traceback (ValueError from a 5000-digit integer,
    RecursionError from deep nesting, OverflowError from a `ts` of 10**400 in the table)."""
    import subprocess
    import sys

    root = f"fedsilo/v1/{FED}/site"
    good = {"id": "north", "role": "site", "state": "idle", "ts": time.time(), "round": 2}
    retained = {
        f"{root}/north/status": json.dumps(good).encode(),
        f"{root}/east/status": b'{"id": "east", "role": "site", "state": "idle", "ts": 1'
                               + b"0" * 400 + b"}",
        f"{root}/south/status": b'{"id": "south", "n": ' + b"9" * 5000 + b"}",
        f"{root}/west/status": b"[" * 100_000 + b"]" * 100_000,
        f"{root}/up/status": b"\xff\xfe not utf-8",
        f"{root}/down/status": b'"a string"',
        f"{root}/Bad_Id/status": json.dumps(good).encode(),
    }
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="vandal")
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    for topic, payload in retained.items():
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    for extra in ([], ["--json"]):
        run = subprocess.run([sys.executable, "-m", "agent", "status", "--broker",
                              f"127.0.0.1:{mosquitto.port}", *extra],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert "north" in run.stdout and "east" in run.stdout
        assert run.stderr.count("ignored status on") == 5, run.stderr
        assert run.stderr.count("bad_status_json") == 4
        bad = f"{root}/Bad_Id/status"
    assert f"{bad} ({len(retained[bad])} bytes): bad_topic" in run.stderr
    doc = json.loads(run.stdout)
    assert sorted(doc["federations"][FED]["sites"]) == ["east", "north"]

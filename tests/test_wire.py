"""Envelope, manifests, topics and reassembly: the wire rules of PROTOCOL.md without a broker."""

from __future__ import annotations

import os
import random
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ProtocolError
from agent.federation import envelope, topics
from agent.federation.envelope import BodyKind, make_manifest, parse_manifest
from agent.federation.reassembly import Reassembler
from agent.federation.transport import backoff_delay


def manifest_for(body: bytes, chunk_size: int = 1000, rnd: int = 3, sender: str = "north"):
    return make_manifest(federation="fed", round=rnd, sender=sender, body_kind=BodyKind.UPDATE,
                         body=body, created=1.5, meta={"n_samples": 7}, chunk_size=chunk_size)


def test_envelope_round_trip_is_byte_exact():
    payload = envelope.encode({"kind": "chunk", "x": 1}, b"\x00\x01body")
    assert payload[:4] == b"FSLO" and payload[4] == envelope.PROTOCOL_MAJOR
    env = envelope.decode(payload, max_body=100)
    assert env.header == {"kind": "chunk", "x": 1}
    assert env.body == b"\x00\x01body"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"FS", "too_short"),
        (b"XXXX" + bytes(6), "bad_magic"),
        (struct.pack(">4sBBI", b"FSLO", 9, 0, 2) + b"{}", "unsupported_version"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 50) + b"{}", "truncated_header"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 10**9), "header_too_large"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 3) + b"{x}", "bad_header_json"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 2) + b"[]", "bad_header"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 15) + b'{"kind":"evil"}', "unknown_kind"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 16) + b'{"kind":"chunk"}' + bytes(101),
         "body_too_large"),
        (struct.pack(">4sBBI", b"FSLO", 1, 0, 24) + b'{"kind":"chunk","v":NaN}',
         "bad_header_json"),
    ],
)
def test_decode_rejects_with_reason(payload, reason):
    with pytest.raises(ProtocolError) as info:
        envelope.decode(payload, max_body=100)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_raises_anything_but_protocol_error(data):
    for payload in (data, b"FSLO\x01\x00" + data):
        try:
            env = envelope.decode(payload, max_body=1000)
        except ProtocolError:
            continue
        assert isinstance(env.header, dict)


def test_manifest_round_trip_and_size_caps():
    body = os.urandom(2500)
    m = manifest_for(body)
    assert m.n_chunks == 3 and m.chunk_span(2) == (2000, 2500)
    again = parse_manifest(envelope.decode(envelope.encode(m.header()), max_body=0).header,
                           max_body=10_000)
    assert again == m
    with pytest.raises(ProtocolError, match="body_len"):
        parse_manifest(m.header(), max_body=2000)  # declared size over the cap: refused early
    bad = m.header() | {"chunk_digests": m.header()["chunk_digests"][:2]}
    with pytest.raises(ProtocolError, match="chunk_digests"):
        parse_manifest(bad, max_body=10_000)
    with pytest.raises(ProtocolError, match="body_kind"):
        parse_manifest(m.header() | {"body_kind": "pickle"}, max_body=10_000)


def chunks_of(m, body):
    out = []
    for index, payload in envelope.iter_chunks(m, body):
        env = envelope.decode(payload, max_body=envelope.MAX_CHUNK_BYTES)
        ref = envelope.parse_chunk_header(env.header)
        assert ref.index == index and ref.nonce == m.nonce
        out.append((ref, env.body))
    return out


def test_reassembly_any_order_with_duplicates_and_early_chunks():
    body = os.urandom(5500)
    m = manifest_for(body)
    parts = chunks_of(m, body)
    r = Reassembler()
    rng = random.Random(1)
    shuffled = parts + parts[:3]
    rng.shuffle(shuffled)
    early, late = shuffled[:2], shuffled[2:]
    for p in early:  # chunks before their manifest are parked, not lost
        assert r.add_chunk(*p, now=0.0) is None
    done = r.add_manifest(m, 0.0)
    for p in late:
        result = r.add_chunk(*p, now=0.0)
        done = done or result
    assert done is not None and done.body == body and done.manifest == m
    # Everything after completion is an idempotent no-op.
    assert r.add_manifest(m, 1.0) is None
    assert r.add_chunk(*parts[0], now=1.0) is None
    assert r.pending_count() == 0


def test_reassembly_rejects_tampered_chunks_and_lists_missing():
    body = os.urandom(3000)
    m = manifest_for(body)
    parts = chunks_of(m, body)
    r = Reassembler()
    r.add_manifest(m, now=0.0)
    ref, data = parts[1]
    with pytest.raises(ProtocolError) as info:
        r.add_chunk(ref, bytes([data[0] ^ 1]) + data[1:], now=0.0)
    assert info.value.reason == "chunk_digest_mismatch"
    with pytest.raises(ProtocolError, match="bad_chunk_size"):
        r.add_chunk(ref, data[:-1], now=0.0)
    r.add_chunk(*parts[0], now=0.5)
    # The same body under a new manifest (a re-opened round) is collected anew.
    again = replace(m, nonce="f" * 32)
    assert r.add_manifest(again, now=0.5) is None and r.pending_count() == 2
    r.forget_rounds_before(3)
    assert r.pending_count() == 2
    assert r.due_requests(now=1.0, after_s=2.0) == []
    due = r.due_requests(now=3.0, after_s=2.0)
    assert sorted((d[0].nonce == m.nonce, d[1]) for d in due) == [(False, [0, 1, 2]),
                                                                   (True, [1, 2])]
    assert r.due_requests(now=3.5, after_s=2.0) == []  # not asked again at once
    r.forget_rounds_before(4)
    assert r.pending_count() == 0


def test_no_resend_request_while_other_bodies_still_arrive_then_requests_back_off():
    """200 sites' updates queue behind each other: a body waiting its turn is not asked for
    while chunks of others keep coming; once all is quiet, each body is asked at 2, 4, 8 s."""
    a_body, b_body = os.urandom(3000), os.urandom(3000)
    a, b = manifest_for(a_body, sender="north"), manifest_for(b_body, sender="south")
    a_parts, b_parts = chunks_of(a, a_body), chunks_of(b, b_body)
    r = Reassembler()
    r.add_manifest(a, now=0.0)
    r.add_manifest(b, now=0.0)
    r.add_chunk(*a_parts[0], now=0.0)
    for t, part in zip((1.5, 3.0, 4.5), b_parts, strict=True):
        assert r.due_requests(now=t - 0.1, after_s=2.0) == []  # south's chunks still flow
        r.add_chunk(*part, now=t)
    assert r.pending_count() == 1  # south is complete at 4.5; from then on nothing arrives
    asked = [t / 10 for t in range(0, 400) if r.due_requests(now=t / 10, after_s=2.0)]
    assert asked == [6.5, 10.5, 18.5, 34.5]  # quiet for 2 s, then 4, 8, 16 s between asks
    r.add_chunk(*a_parts[1], now=40.0)  # the sender answered: the back-off starts over
    assert [d[1] for d in r.due_requests(now=42.0, after_s=2.0)] == [[2]]


def test_a_chunk_asked_for_by_many_is_resent_once_per_interval():
    from agent.federation.peer import RESEND_AFTER_S, _Outgoing

    body = os.urandom(2500)
    out = _Outgoing(manifest_for(body), body, "m", lambda i: f"c/{i}", None)
    assert out.hold([0, 2], now=100.0) == [0, 2]
    assert out.hold([0, 1, 2], now=100.5) == [1]  # 0 and 2 are on their way to everyone
    assert out.hold([0], now=100.0 + RESEND_AFTER_S) == [0]  # lost again: sent again
    assert out.hold([1], now=105.0, hold_s=10.0) == []  # a broadcast sender holds longer
    assert out.hold([1], now=110.5, hold_s=10.0) == [1]


def test_reassembly_bounds_pending_and_orphans():
    r = Reassembler(max_pending=2, max_orphan_bytes=100)
    for i in range(2):
        r.add_manifest(manifest_for(os.urandom(10), sender=f"s{i}"), 0.0)
    with pytest.raises(ProtocolError, match="too_many_pending"):
        r.add_manifest(manifest_for(os.urandom(10), sender="s9"), 0.0)
    ref = envelope.ChunkRef("fed", 1, "x", "a" * 64, "n", 0)
    r.add_chunk(ref, bytes(80), now=0.0)
    with pytest.raises(ProtocolError, match="orphan_budget"):
        r.add_chunk(replace(ref, index=1), bytes(80), now=0.0)


class Collect:
    """A sink that keeps what it is fed (and can refuse at a given byte count)."""

    def __init__(self, refuse_after: int | None = None) -> None:
        self.data = bytearray()
        self.finished = False
        self.refuse_after = refuse_after

    def feed(self, data: bytes) -> None:
        if self.refuse_after is not None and len(self.data) + len(data) > self.refuse_after:
            raise ProtocolError("bad_update", "refused by the sink")
        self.data += data

    def finish(self) -> None:
        self.finished = True


def test_streamed_body_reaches_the_sink_in_order_whatever_the_arrival_order():
    body = os.urandom(9500)
    m = manifest_for(body)
    parts = chunks_of(m, body)
    r = Reassembler()
    sink = Collect()
    shuffled = parts + parts[:2]
    random.Random(2).shuffle(shuffled)
    assert r.add_chunk(*shuffled[0], now=0.0) is None  # early: parked until the manifest
    done = r.add_manifest(m, 0.0, sink)
    fed = []
    for p in shuffled[1:]:
        done = r.add_chunk(*p, now=0.0) or done
        fed.append(len(sink.data))
    now = 0.0
    while done is None:  # chunks too far ahead were dropped: the sender is asked again
        now += 3.0
        for _, missing in r.due_requests(now=now, after_s=2.0):
            for i in missing:
                done = r.add_chunk(*parts[i], now=now) or done
                fed.append(len(sink.data))
    assert done.body == b"" and sink.finished
    assert bytes(sink.data) == body
    assert fed == sorted(fed)  # only ever appended, never rewound
    assert r.add_chunk(*parts[3], now=1.0) is None and r.pending_count() == 0


def test_streaming_keeps_few_chunks_ahead_and_asks_again_for_the_rest():
    body = os.urandom(10_000)
    m = manifest_for(body)
    parts = chunks_of(m, body)  # 10 chunks
    r = Reassembler(max_ahead_bytes=3000)
    sink = Collect()
    r.add_manifest(m, 0.0, sink)
    for p in parts[1:]:  # chunk 0 is late: only 3 of the 9 others fit the ahead budget
        r.add_chunk(*p, now=0.0)
    assert sink.data == b""
    due = r.due_requests(now=5.0, after_s=2.0)
    assert due[0][1] == [0, 4, 5, 6, 7, 8, 9]
    done = r.add_chunk(*parts[0], now=5.0)  # fills the gap: 0..3 go to the sink
    assert done is None and bytes(sink.data) == body[:4000]
    for p in parts[4:]:  # the resent ones
        done = r.add_chunk(*p, now=6.0) or done
    assert done is not None and bytes(sink.data) == body


def test_a_sink_refusal_ends_the_body_and_a_bad_digest_is_caught():
    body = os.urandom(5000)
    m = manifest_for(body)
    parts = chunks_of(m, body)
    r = Reassembler()
    r.add_manifest(m, 0.0, Collect(refuse_after=2500))
    r.add_chunk(*parts[0], now=0.0)
    r.add_chunk(*parts[1], now=0.0)
    with pytest.raises(ProtocolError, match="refused by the sink"):
        r.add_chunk(*parts[2], now=0.0)
    assert r.pending_count() == 0 and r.add_chunk(*parts[3], now=0.0) is None
    # A manifest whose chunk digests hold but whose body digest does not (a forged manifest)
    forged = replace(manifest_for(body, rnd=4), body_digest="0" * 64)
    sink = Collect()
    r.add_manifest(forged, 0.0, sink)
    with pytest.raises(ProtocolError, match="body_digest_mismatch"):
        for ref, data in chunks_of(forged, body):
            r.add_chunk(ref, data, now=0.0)
    assert not sink.finished and r.pending_count() == 0
    # A refused manifest's chunks are ignored, not parked.
    other = manifest_for(body, rnd=5)
    r.refuse(other)
    assert r.known(other) and r.add_chunk(*chunks_of(other, body)[0], now=0.0) is None


def test_empty_body_completes_on_manifest():
    m = manifest_for(b"")
    done = Reassembler().add_manifest(m, 0.0)
    assert done is not None and done.body == b"" and m.n_chunks == 0


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("fedsilo/v1/fed/coordinator/status", ("coordinator", "status", None, None, None)),
        ("fedsilo/v1/fed/coordinator/round/12/manifest", ("coordinator", "manifest", 12, None,
                                                          None)),
        ("fedsilo/v1/fed/coordinator/round/12/chunk/3", ("coordinator", "chunk", 12, 3, None)),
        ("fedsilo/v1/fed/coordinator/req/north", ("coordinator", "req", None, None, "north")),
        ("fedsilo/v1/fed/site/north/update/2/chunk/0", ("north", "chunk", 2, 0, "north")),
        ("fedsilo/v1/fed/site/north/status", ("north", "status", None, None, "north")),
        ("fedsilo/v1/fed/site/north/req", ("north", "req", None, None, "north")),
    ],
)
def test_topic_parse_table(topic, expected):
    t = topics.parse(topic)
    assert t is not None and (t.sender, t.kind, t.round, t.index, t.site) == expected


@pytest.mark.parametrize("topic", [
    "fedsilo/v2/fed/coordinator/status", "other/v1/fed/coordinator/status",
    "fedsilo/v1/fed/site/North/status", "fedsilo/v1/fed/site/north/update/-1/manifest",
    "fedsilo/v1/fed/coordinator/round/x/manifest", "fedsilo/v1/fed/site/north/update/1/chunk",
    "fedsilo/v1/Fed!/coordinator/status", "fedsilo/v1/fed/coordinator/round/1/manifest/extra",
    "fedsilo/v1/fed/site/coordinator/status", "fedsilo/v1/fed/site/coordinator/update/1/manifest",
])
def test_topic_parse_refuses_anything_else(topic):
    assert topics.parse(topic) is None


def test_builders_and_parser_agree():
    assert topics.parse(topics.site_chunk("fed", "a-1", 4, 9)) == topics.Topic(
        "fed", "a-1", "chunk", round=4, index=9, site="a-1")
    assert topics.parse(topics.coordinator_manifest("fed", 0)).round == 0


def test_backoff_is_capped_full_jitter():
    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, 30.0, rng) for a in range(40) for _ in range(20)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    early = [backoff_delay(0, 0.5, 30.0, rng) for _ in range(200)]
    assert max(early) <= 0.5 and min(early) < 0.1  # jitter spreads from zero
    late = [backoff_delay(20, 0.5, 30.0, rng) for _ in range(200)]
    assert max(late) > 25.0  # reaches the cap, never beyond


# ------------------------------------------------------------------ hostile topic levels

# Every character Python calls a digit that is not an ASCII one: superscripts, circled and
# full-width digits, Arabic-Indic and dozens of other scripts. `str.isdigit()` takes them all
# and `int()` raises on some ('²', '①'): on a topic, that ended the process.
UNICODE_DIGITS = [chr(c) for c in range(0x110000)
                  if not (0xD800 <= c <= 0xDFFF) and chr(c).isdigit() and not chr(c).isascii()]
NUMBERED = [  # (builder with one level left to fill, which level)
    lambda x: f"fedsilo/v1/fed/coordinator/round/{x}/manifest",
    lambda x: f"fedsilo/v1/fed/coordinator/round/{x}/chunk/0",
    lambda x: f"fedsilo/v1/fed/coordinator/round/0/chunk/{x}",
    lambda x: f"fedsilo/v1/fed/site/north/update/{x}/manifest",
    lambda x: f"fedsilo/v1/fed/site/north/update/{x}/chunk/0",
    lambda x: f"fedsilo/v1/fed/site/north/update/1/chunk/{x}",
]


def test_every_non_ascii_digit_in_a_number_level_is_refused():
    assert len(UNICODE_DIGITS) > 500 and {"²", "①", "１", "١"} <= set(UNICODE_DIGITS)
    for build in NUMBERED:
        assert topics.parse(build("1")) is not None
        for d in UNICODE_DIGITS:
            for level in (d, "1" + d, d + "0"):
                assert topics.parse(build(level)) is None, ascii(level)


@pytest.mark.parametrize("level", [
    "", " 1", "1 ", "+1", "-0", "1_0", "01", "00", "1.0", "1e3", "0x1", "\x001", "1\x00",
    "1\n", "99999999999999999999", "1" + "0" * 10, str(envelope.MAX_ROUND + 1), "+", "#",
    "1" * 5000,
])
def test_number_levels_are_plain_ascii_digits_in_bounds(level):
    for build in NUMBERED:
        assert topics.parse(build(level)) is None, (build("x"), level)


def test_number_levels_at_their_bounds():
    top = topics.parse(topics.site_chunk("fed", "north", envelope.MAX_ROUND,
                                         envelope.MAX_CHUNK_INDEX))
    assert top is not None and (top.round, top.index) == (envelope.MAX_ROUND,
                                                           envelope.MAX_CHUNK_INDEX)
    assert topics.parse(topics.site_chunk("fed", "north", 1, envelope.MAX_CHUNK_INDEX + 1)) \
        is None


_LEVEL = st.one_of(
    st.sampled_from(["fedsilo", "v1", "fed", "coordinator", "site", "north", "round", "update",
                     "manifest", "chunk", "req", "status", "metrics", "control", "0", "7",
                     "+", "#", "", "\x00"]),
    st.sampled_from(UNICODE_DIGITS),
    st.integers(min_value=-10, max_value=10**30).map(str),
    st.text(max_size=12),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=4),
    st.integers(min_value=1, max_value=3000).map(lambda n: "9" * n),
)


_SHAPES = [["coordinator", "round", None, "manifest"], ["coordinator", "round", None, "chunk",
                                                         None],
           ["site", "north", "update", None, "manifest"],
           ["site", "north", "update", None, "chunk", None], ["coordinator", "req", None],
           ["site", None, "status"]]


@st.composite
def _topic_levels(draw) -> list[str]:
    """A topic's levels: a fedsilo shape with its variable levels drawn (and sometimes a level
    dropped or added), or levels drawn at random."""
    if draw(st.booleans()):
        return draw(st.lists(_LEVEL, max_size=9))
    levels = [draw(_LEVEL) if x is None else x for x in draw(st.sampled_from(_SHAPES))]
    if draw(st.integers(0, 4)) == 0:
        levels.insert(draw(st.integers(0, len(levels))), draw(_LEVEL))
    elif draw(st.integers(0, 4)) == 0:
        del levels[draw(st.integers(0, len(levels) - 1))]
    return levels


@settings(max_examples=3000, deadline=None)
@given(_topic_levels(), st.integers(0, 9))
def test_topic_parse_never_raises_and_only_returns_canonical_in_bound_topics(levels, prefixed):
    name = "/".join((["fedsilo", "v1", "fed"] if prefixed else []) + levels)  # mostly
    t = topics.parse(name)
    if t is None:
        return
    for value, hi in ((t.round, envelope.MAX_ROUND), (t.index, envelope.MAX_CHUNK_INDEX)):
        assert value is None or (type(value) is int and 0 <= value <= hi)
    # what parses is exactly what the builders write: one spelling per topic
    rebuilt = {
        ("coordinator", "manifest"): lambda: topics.coordinator_manifest(t.federation, t.round),
        ("coordinator", "chunk"): lambda: topics.coordinator_chunk(t.federation, t.round,
                                                                    t.index),
        ("coordinator", "req"): lambda: topics.coordinator_req(t.federation, t.site),
        ("coordinator", "status"): lambda: topics.coordinator_status(t.federation),
        ("coordinator", "control"): lambda: topics.coordinator_control(t.federation),
    }.get((t.sender, t.kind)) if t.sender == "coordinator" else {
        "manifest": lambda: topics.site_manifest(t.federation, t.site, t.round),
        "chunk": lambda: topics.site_chunk(t.federation, t.site, t.round, t.index),
        "status": lambda: topics.site_status(t.federation, t.site),
        "metrics": lambda: topics.site_metrics(t.federation, t.site),
        "req": lambda: topics.site_req(t.federation, t.site),
    }.get(t.kind)
    assert rebuilt is not None and rebuilt() == name


@pytest.mark.parametrize("value", ["1" + "0" * 400, "1e400", "-1e400", "9" * 5000])
def test_header_numbers_that_overflow_a_float_are_refused(value):
    """`created` of 10**400 made parse_manifest's float() raise OverflowError (a crash)."""
    head = envelope.encode(manifest_for(b"abc").header())[envelope._PREFIX.size:]
    head = head.replace(b'"created":1.5', b'"created":' + value.encode())
    assert value.encode() in head
    raw = envelope._PREFIX.pack(envelope.MAGIC, 1, 0, len(head)) + head
    with pytest.raises(ProtocolError) as exc:
        envelope.decode(raw, max_body=100)
    assert exc.value.reason == "bad_header_json"


def test_a_topic_that_is_not_utf8_reaches_the_receiver_instead_of_ending_the_network_thread():
    """paho decodes the topic when it is read; raised in our on_message, the error would end
    the network thread (Mosquitto refuses such topics, other brokers may not)."""
    import paho.mqtt.client as mqtt

    from agent.config import BrokerConfig
    from agent.federation.transport import Transport

    t = Transport("probe", BrokerConfig())
    msg = mqtt.MQTTMessage(mid=3, topic=b"fedsilo/v1/fed/site/north/update/\xff/manifest")
    msg.payload, msg.qos = b"x", 1
    t._on_message(None, None, msg)
    got = t.inbox.get_nowait()
    assert got.topic == "fedsilo/v1/fed/site/north/update/\ufffd/manifest" and got.mid == 3
    assert topics.parse(got.topic) is None

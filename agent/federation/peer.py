"""What the site and the coordinator share on the wire: send bodies, receive bodies, resend.

A `Peer` turns the transport's raw `(topic, payload)` stream into validated events. Every
rejection is logged by topic, size and reason (never payload bytes) and counted, and the
process keeps running. Resend requests for bodies this peer sent are answered here, so the
roles only see complete, digest-checked bodies.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.config import IdentityFiles, TLSFiles
from agent.errors import BrokerError, ConfigError, NotWanted, ProtocolError
from agent.federation import envelope, topics
from agent.federation.envelope import Manifest, MessageKind
from agent.federation.reassembly import Reassembler, Sink
from agent.federation.transport import Transport
from agent.ops.crashpoints import crash_point

if TYPE_CHECKING:  # cryptography is imported only when a process has an identity
    from agent.security.signing import Signer, Verifier

log = logging.getLogger(__name__)

RESEND_AFTER_S = 2.0
# A resend of a broadcast body goes to every site: at 200 sites one 1 MiB chunk is 200 MB out of
# the broker (benchmarks/bench_scale.py), so the coordinator serves one per chunk per 10 s.
BROADCAST_RESEND_HOLD_S = 10.0
PUBLISH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Trust:
    """Our signing identity and the federation CA that must vouch for every peer."""

    signer: Signer
    verifier: Verifier

    @classmethod
    def load(cls, files: IdentityFiles | None, tls: TLSFiles | None, identity: str
             ) -> Trust | None:
        """From the config's [identity], else its TLS client identity (neither: unsigned, the
        demo without a PKI); the certificate must be this process's own identity."""
        if files is None and tls is not None:
            files = IdentityFiles(tls.ca, tls.cert, tls.key)
        if files is None:
            return None
        from agent.security.signing import Signer, Verifier

        signer = Signer(files.cert, files.key)
        if signer.name != identity:
            raise ConfigError(str(files.cert), "identity", f"certificate is for {signer.name!r}, "
                                                           f"this process is {identity!r}")
        return cls(signer, Verifier(files.ca, files.crl))

    @property
    def problem(self) -> str | None:
        """`crl_stale` while every peer signature is refused for an expired CRL, else None."""
        return self.verifier.problem


@dataclass(frozen=True)
class BodyReady:
    topic: topics.Topic
    manifest: Manifest
    body: bytes  # empty when the body was streamed (Peer.open_stream)


@dataclass(frozen=True)
class StatusSeen:
    topic: topics.Topic
    status: dict[str, Any]


@dataclass
class _Outgoing:
    manifest: Manifest
    body: bytes
    manifest_topic: str
    chunk_topic: Callable[[int], str]
    expiry_s: float | None
    retain_manifest: bool = False
    resent_at: dict[int, float] = field(default_factory=dict)  # chunk index (-1: all): when

    def hold(self, indices: list[int], now: float, hold_s: float = RESEND_AFTER_S
             ) -> list[int]:
        """Those of `indices` not resent in the last `hold_s`, marked as resent now.

        A chunk resent moments ago is on its way: a broadcast body (the coordinator's task)
        reaches every site with one resend, however many of them asked."""
        due = [i for i in indices if i not in self.resent_at or now - self.resent_at[i] >= hold_s]
        self.resent_at.update(dict.fromkeys(due, now))
        return due


class Peer:
    def __init__(self, transport: Transport, federation: str, identity: str, *,
                 max_body: int, accept: Callable[[topics.Topic], bool],
                 trust: Trust | None = None, resend_hold_s: float = RESEND_AFTER_S) -> None:
        """`resend_hold_s`: how long after resending a chunk a new request for it is ignored;
        a sender whose bodies are broadcasts (the coordinator) holds longer: each resend of
        its task reaches every site."""
        self.transport = transport
        self.resend_hold_s = resend_hold_s
        self.federation = federation
        self.identity = identity
        self.max_body = max_body
        self.accept = accept
        self.trust = trust
        if trust is None:
            log.warning("manifests are neither signed nor checked: anyone who can publish on "
                        "the broker can forge bodies; only for the local demo ([identity])")
        self.reassembler = Reassembler()
        # The role may stream some bodies instead of receiving them whole: called once per
        # new manifest, it returns a Sink (or None to buffer); a ProtocolError refuses the body.
        self.open_stream: Callable[[topics.Topic, Manifest], Sink | None] | None = None
        self.rejected: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._outgoing: dict[tuple[int, str], _Outgoing] = {}

    # ------------------------------------------------------------------ sending

    def send_body(self, manifest_topic: str, chunk_topic: Callable[[int], str],
                  manifest: Manifest, body: bytes, *, retain_manifest: bool = False,
                  expiry_s: float | None = None, wait_s: float = PUBLISH_TIMEOUT_S) -> int:
        """Publish manifest then chunks, wait for every acknowledgement; returns bytes sent.
        Sending the same manifest again is harmless: receivers key bodies by its nonce."""
        out = self.keep_sent(manifest_topic, chunk_topic, manifest, body,
                             retain_manifest=retain_manifest, expiry_s=expiry_s)
        return self._publish(out, wait_s)

    def keep_sent(self, manifest_topic: str, chunk_topic: Callable[[int], str],
                  manifest: Manifest, body: bytes, *, retain_manifest: bool = False,
                  expiry_s: float | None = None) -> _Outgoing:
        """Remember a body as sent, to answer resend requests for it (also one sent by an
        earlier process, kept on disk)."""
        out = _Outgoing(manifest, body, manifest_topic, chunk_topic, expiry_s, retain_manifest)
        self._outgoing[(manifest.round, manifest.body_digest)] = out
        return out

    def _publish(self, out: _Outgoing, wait_s: float) -> int:
        manifest, body = out.manifest, out.body
        header = manifest.header()
        if self.trust is not None:
            header = self.trust.signer.sign(header)
        head = envelope.encode(header)
        infos = [self.transport.publish(out.manifest_topic, head, retain=out.retain_manifest)]
        sent = len(head)
        for index, payload in envelope.iter_chunks(manifest, body):
            infos.append(self.transport.publish(out.chunk_topic(index), payload,
                                                expiry_s=out.expiry_s))
            sent += len(payload)
            if index == 0 and manifest.n_chunks > 1:
                crash_point("peer.upload_partial",
                            before=lambda: self.transport.wait_published(infos, wait_s))
        self.transport.wait_published(infos, wait_s)
        self.bytes_sent += sent
        return sent

    def forget_sent_before(self, rnd: int) -> None:
        for key in [k for k in self._outgoing if k[0] < rnd]:
            del self._outgoing[key]

    def _serve_resend(self, header: dict[str, Any]) -> None:
        fed, rnd, _sender, digest, missing = envelope.parse_resend(header)
        if fed == self.federation and digest == envelope.WHOLE_BODY:
            # "Everything you sent for this round": its manifest was lost on the way.
            out = next((o for (r, _d), o in self._outgoing.items() if r == rnd), None)
            if out is None:
                raise ProtocolError("resend_unknown_body", f"round {rnd}")
            if out.hold([-1], time.monotonic(), self.resend_hold_s):
                log.info("sending round %d's %s again, as asked", rnd,
                         out.manifest.body_kind.value)
                self._publish(out, PUBLISH_TIMEOUT_S)
            return
        out = self._outgoing.get((rnd, digest))
        if fed != self.federation or out is None:
            raise ProtocolError("resend_unknown_body", f"round {rnd}")
        infos = []
        if any(index >= out.manifest.n_chunks for index in missing):
            raise ProtocolError("bad_chunk_index", f"resend of {max(missing)}")
        missing = out.hold(missing, time.monotonic(), self.resend_hold_s)
        if not missing:
            return
        for index in missing:
            a, b = out.manifest.chunk_span(index)
            payload = envelope.encode(envelope.chunk_header(out.manifest, index), out.body[a:b])
            infos.append(self.transport.publish(out.chunk_topic(index), payload,
                                                expiry_s=out.expiry_s))
            self.bytes_sent += len(payload)
        self.transport.wait_published(infos, PUBLISH_TIMEOUT_S)
        log.info("resent %d chunk(s) of round %d", len(missing), rnd)

    def ask_whole(self, peer: str, rnd: int, req_topic: str) -> None:
        """Ask a peer for everything it sent this round (we never saw its manifest)."""
        head = envelope.resend_header(federation=self.federation, round=rnd,
                                      sender=self.identity, body_digest=envelope.WHOLE_BODY,
                                      missing=[])
        if self.trust is not None:
            head = self.trust.signer.sign(head)
        log.info("asking %s to send its round %d answer again (it says it sent one; none "
                 "arrived)", peer, rnd)
        self.transport.publish(req_topic, envelope.encode(head))

    def request_missing(self, req_topic: Callable[[Manifest], str]) -> None:
        """Ask senders again for chunks that stopped arriving (never trust broker queues)."""
        for manifest, missing in self.reassembler.due_requests(time.monotonic(), RESEND_AFTER_S):
            head = envelope.resend_header(federation=self.federation, round=manifest.round,
                                          sender=self.identity, body_digest=manifest.body_digest,
                                          missing=missing)
            if self.trust is not None:  # else a broker could make senders publish again
                head = self.trust.signer.sign(head)
            log.info("asking %s again for %d chunk(s) of round %d", manifest.sender,
                     len(missing), manifest.round)
            self.transport.publish(req_topic(manifest), envelope.encode(head))

    # ------------------------------------------------------------------ receiving

    def poll(self, timeout_s: float) -> list[BodyReady | StatusSeen]:
        """Wait up to `timeout_s` for traffic, then drain what is queued into events."""
        events: list[BodyReady | StatusSeen] = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self.transport.receive(max(0.0, remaining) if not events else 0)
            except queue.Empty:
                return events
            event = self._handle(msg.topic, msg.payload)
            if event is not None:
                events.append(event)

    def _handle(self, topic_name: str, payload: bytes) -> BodyReady | StatusSeen | None:
        """One received message: an event, or None. Never raises for what a peer sent: every
        refusal is counted and logged by topic, size and reason, never by payload bytes."""
        try:
            topic = topics.parse(topic_name)  # first: nothing else is looked at before it
            if topic is None:
                raise ProtocolError("bad_topic")
            if not payload:
                return None  # a cleared retained message
            self.bytes_received += len(payload)
            if topic.federation != self.federation:
                raise ProtocolError("foreign_topic")
            if not self.accept(topic):
                raise ProtocolError("unexpected_topic")
            if topic.kind == "status":
                return StatusSeen(topic, _parse_status(payload))
            return self._handle_envelope(topic, payload)
        except NotWanted as exc:
            log.info("ignored message on %s: %s", topic_name[:200], exc)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.warning("dropped message on %s (%d bytes): %s", topic_name[:200], len(payload),
                        exc)
        except BrokerError as exc:
            self.rejected["publish_failed"] += 1
            log.error("could not answer message on %s: %s", topic_name[:200], exc)
        except Exception as exc:  # noqa: BLE001 - one bad message must not end the process
            # Only the class: an exception's text may quote the payload. Exception, not
            # BaseException: a stop request (KeyboardInterrupt, the site's _Stopping) unwinds.
            self.rejected["malformed"] += 1
            log.warning("dropped message on %s (%d bytes): malformed (%s while handling it)",
                        topic_name[:200], len(payload), type(exc).__name__)
        return None

    def _handle_envelope(self, topic: topics.Topic, payload: bytes) -> BodyReady | None:
        env = envelope.decode(payload, max_body=self.max_body)
        header = env.header
        if header.get("federation") != self.federation:
            raise ProtocolError("foreign_federation")
        if header.get("sender") != topic.sender:
            raise ProtocolError("sender_topic_mismatch")
        if env.kind is MessageKind.RESEND:
            if topic.kind != "req":
                raise ProtocolError("kind_topic_mismatch")
            self._verify(header, topic)
            self._serve_resend(header)
            return None
        now = time.monotonic()
        if env.kind is MessageKind.MANIFEST:
            if topic.kind not in ("manifest", "control") or env.body:
                raise ProtocolError("kind_topic_mismatch")
            self._verify(header, topic)  # before the manifest is used for anything
            manifest = envelope.parse_manifest(header, max_body=self.max_body)
            if topic.round is not None and manifest.round != topic.round:
                raise ProtocolError("round_topic_mismatch")
            sink = None
            if self.open_stream is not None and not self.reassembler.known(manifest):
                try:
                    sink = self.open_stream(topic, manifest)
                except ProtocolError:
                    self.reassembler.refuse(manifest)
                    raise
            done = self.reassembler.add_manifest(manifest, now, sink)
        else:
            if topic.kind != "chunk":
                raise ProtocolError("kind_topic_mismatch")
            ref = envelope.parse_chunk_header(header)
            if ref.round != topic.round or ref.index != topic.index:
                raise ProtocolError("round_topic_mismatch")
            done = self.reassembler.add_chunk(ref, env.body, now)
        if done is None:
            return None
        return BodyReady(topic=topic, manifest=done.manifest, body=done.body)

    def _verify(self, header: dict[str, Any], topic: topics.Topic) -> None:
        """With [identity]: the sender's signature, by the identity and role its topic names."""
        if self.trust is not None:
            self.trust.verifier.verify(header, sender=topic.sender, role=(
                "coordinator" if topic.sender == "coordinator" else "site"))


def _parse_status(payload: bytes) -> dict[str, Any]:
    if len(payload) > 64 * 1024:
        raise ProtocolError("status_too_large")
    try:
        status = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProtocolError("bad_status_json") from None
    if not isinstance(status, dict):
        raise ProtocolError("bad_status_json")
    return status

"""MQTT transport: paho-mqtt 2.x with persistent sessions, QoS 1, reconnect with jitter.

The only module that touches paho. Roles see three things: `publish` (tracked until the
broker acknowledges it), `wait_published` (a timeout is a failure), and `receive`, which hands
over incoming `(topic, payload)` pairs one at a time in their own main loop, so all federation
logic runs on one thread and paho's network thread does nothing but I/O.

Incoming QoS 1 messages are acknowledged when the main loop takes them, not when they arrive
(paho's manual_ack), and MQTT 5's Receive Maximum tells the broker to keep at most
`RECEIVE_MAXIMUM` unacknowledged messages in flight to us (MQTT 3.1.1 has no such field; the
broker's own in-flight limit bounds it). On a broker that honours it, a burst of 1 MiB chunks
from thirty sites waits at the broker, not in our memory. Measured on Debian 12's Mosquitto
2.0.11: the limit holds until the first acknowledgement, after which the broker sends on
regardless (a receiver taking 200 messages slowly held up to 188), so with thirty sites
uploading float32 updates at once the coordinator's queue still reached ~60 MB (docs/perf.md).
So the inbox is bounded here too, for both protocols: while it holds `inbox_max_bytes` or
`inbox_max_messages`, the network thread stops reading the socket (it still writes, so acks
and publishes go out, and keeps paho's timers) until the main loop has taken enough. Nothing
is dropped: unread messages wait in TCP buffers and at the broker, which is where MQTT's flow
control means them to wait. While the main loop waits for acknowledgements of its own
publishes (`wait_published`) reading goes on regardless: a PUBACK can only be read after the
messages before it, and the main loop cannot take those while it waits (the bound is then
exceeded by what arrives during the wait, instead of a deadlock). A main loop that takes
nothing for longer than the keepalive ends the connection (paho's PINGRESP goes unread); the
session then redelivers what was unacked.

We run paho's `loop()` in our own thread rather than `loop_start()` because paho's built-in
reconnect doubles a fixed delay without jitter; fifty hospitals reconnecting in lock-step after
a broker restart is exactly what full jitter avoids. paho does not know about our thread, so
it would write from whichever thread calls `publish` or `ack`; a write hook (`_make_client`)
makes it queue instead, and only the network thread ever touches the socket.
"""

from __future__ import annotations

import logging
import queue
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BrokerConfig
from agent.errors import BrokerError

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
RECEIVE_MAXIMUM = 16  # unacknowledged QoS 1 messages the broker may have in flight to us
INBOX_MAX_BYTES = 16 << 20  # payload bytes held for the main loop before reading pauses (16
# full chunks keep it busy; a larger bound is only memory: with 200 sites' updates queued at the
# broker the inbox stays full, benchmarks/bench_scale.py)
INBOX_MAX_MESSAGES = 1024
DRAIN_S = 2.0  # at most this long, on a clean stop, for the broker to read our DISCONNECT
# CONNACK reasons that retrying cannot fix (MQTT 5 codes; paho maps 3.1.1 codes onto them).
_TERMINAL_REASONS = {"Bad user name or password", "Not authorized", "Client identifier not valid",
                     "Banned", "Bad authentication method"}


class BrokerRefused(BrokerError):
    """The broker answered and refused us for a reason retrying cannot fix (credentials, not
    authorized, banned): a daemon stops instead of knocking forever."""


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Capped exponential back-off with full jitter (AWS architecture blog's 'Full Jitter')."""
    return rng.uniform(0.0, min(cap_s, base_s * (2 ** min(attempt, 30))))


def _unwrapped(sock: Any) -> Any:
    """The (TLS) socket itself: under websockets paho hands out its wrapper around it."""
    return getattr(sock, "_socket", sock)


def _disable_nagle(client: mqtt.Client) -> None:
    """paho leaves Nagle's algorithm on; with delayed ACKs that costs ~40 ms per small
    request/acknowledge exchange, which dominated our round overhead."""
    sock = _unwrapped(client.socket())
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket (unix socket): nothing to tune


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0
    connection: int = 0  # which connection it came on: an ack only means something on that one


RTT_MAX_BYTES = 4096  # publishes at most this large time the round trip (status, manifests)


class Transport:
    """One MQTT identity: connect once, then stay connected until `close`."""

    def __init__(self, client_id: str, broker: BrokerConfig, *, will: Will | None = None,
                 subscriptions: Iterable[str] = (), reconnect_base_s: float = 0.5,
                 reconnect_cap_s: float = 30.0, inbox_max_bytes: int = INBOX_MAX_BYTES,
                 inbox_max_messages: int = INBOX_MAX_MESSAGES) -> None:
        self.client_id = client_id
        self.broker = broker
        self.will = will
        self.subscriptions = list(subscriptions)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.inbox_max_bytes = inbox_max_bytes
        self.inbox_max_messages = inbox_max_messages
        self.inbox_bytes = 0  # payload bytes in `inbox` (guarded by _inbox_lock)
        self.read_pauses = 0  # times reading paused for a full inbox (status, tests)
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()  # a write queued or the inbox drained: loop again
        self._awaiting_acks = 0  # wait_published calls in progress: keep reading for PUBACKs
        self.reconnect_base_s = reconnect_base_s
        self.reconnect_cap_s = reconnect_cap_s
        self.protocol_used: str | None = None
        self.connects = 0
        self.last_rtt_ms: float | None = None  # publish -> PUBACK of the last small message
        self.publishes_refused = 0  # PUBACKs with a failure reason (MQTT 5: the broker's ACL)
        self.last_refusal: str | None = None  # "<reason> on <topic>"
        self._in_flight: dict[int, tuple[str, float | None]] = {}  # mid: (topic, sent if small)
        self._in_flight_lock = threading.Lock()
        self._rng = random.Random()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._terminal: str | None = None
        self._last_connack: str = ""
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._closing = False

    # ------------------------------------------------------------------ set-up

    def _make_client(self, v5: bool) -> mqtt.Client:
        kwargs = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2,
                  "client_id": self.client_id}
        kwargs["transport"] = self.broker.transport  # "tcp" or "websockets"
        if v5:
            c = mqtt.Client(protocol=mqtt.MQTTv5, manual_ack=True, **kwargs)
        else:
            c = mqtt.Client(protocol=mqtt.MQTTv311, clean_session=False, manual_ack=True,
                            **kwargs)
        if self.broker.transport == "websockets":
            c.ws_set_options(path=self.broker.ws_path)
        proxy = self.broker.proxy
        if proxy is not None:  # HTTP CONNECT (PySocks), under TLS and websockets alike
            import socks

            c.proxy_set(proxy_type=socks.HTTP, proxy_addr=proxy.host, proxy_port=proxy.port,
                        proxy_username=proxy.username, proxy_password=proxy.password)
        if self.broker.tls is not None:
            c.tls_set(ca_certs=str(self.broker.tls.ca), certfile=str(self.broker.tls.cert),
                      keyfile=str(self.broker.tls.key), cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will is not None:
            c.will_set(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
        c.max_inflight_messages_set(32)
        # paho writes to the socket from the *calling* thread when it runs no loop thread of its
        # own (it does not know about ours): a publish or ack from the main loop would then write
        # while our network thread reads. Two threads on one TLS socket corrupt it ("connection
        # lost" under load). With a write hook registered, paho only queues the packet and wakes
        # our loop, so one thread alone touches the socket.
        c.on_socket_register_write = self._network_thread_writes
        c.on_socket_close = self._drain_before_close
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        return c

    def _network_thread_writes(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """The network thread's `loop()` selects for writing whenever paho has packets
        queued (see `_make_client`); a loop paused for a full inbox is woken instead."""
        self._wake.set()

    def connection_status(self) -> dict[str, Any]:
        """How this process reaches the broker, for the status IT watches: the broker as a URL
        (scheme says TCP or WebSockets, TLS or not), the proxy in between, reconnects since
        start."""
        b = self.broker
        return {"broker_url": f"{b.scheme}://{b.host}:{b.port}"
                              + (b.ws_path if b.transport == "websockets" else ""),
                "broker_proxy": str(b.proxy) if b.proxy is not None else None,
                "reconnects": max(0, self.connects - 1),
                "last_rtt_ms": self.last_rtt_ms,
                "publishes_refused": self.publishes_refused}

    def cert_days_left(self) -> float | None:
        """Days until this identity's certificate expires (None without TLS): for status."""
        if self.broker.tls is None:
            return None
        from agent.security.pki import days_left

        try:
            return round(days_left(self.broker.tls.cert), 1)
        except (OSError, ValueError):
            return None  # unreadable now: the TLS connection itself reports that

    def connect(self, timeout_s: float = 10.0, *, retry: bool = False,
                stop: threading.Event | None = None,
                on_wait: Callable[[str, float], None] | None = None) -> bool:
        """Connect (MQTT 5, falling back to 3.1.1 under protocol 'auto'); True once connected.

        Without `retry` (one-shot commands) the first failure raises BrokerError. With it (the
        daemons) an unreachable broker, a failed TLS handshake or a missing CONNACK is tried
        again after a capped, jittered back-off, logging one line per attempt and calling
        `on_wait(text, next_delay_s)` for the service manager; only a refusal retrying cannot
        fix (BrokerRefused) still raises. False: `stop` was set while
        waiting, and nothing is connected.
        """
        self._warn_security()
        attempt = 0
        while True:
            try:
                if self._connect_once(timeout_s, stop):
                    return True
                return False  # stopped during the attempt
            except BrokerRefused:
                raise
            except BrokerError as exc:
                if not retry:
                    raise
                delay = backoff_delay(attempt, self.reconnect_base_s, self.reconnect_cap_s,
                                      self._rng)
                attempt += 1
                text = (f"waiting for MQTT broker {self.broker.host}:{self.broker.port} "
                        f"(attempt {attempt} failed, next in {delay:.1f} s)")
                log.warning("%s; attempt %d, trying again in %.1f s", exc, attempt, delay)
                if on_wait is not None:
                    on_wait(text, delay)
            if stop is not None and stop.wait(delay):
                log.info("stop requested while waiting for the MQTT broker")
                return False
            if stop is None:
                time.sleep(delay)

    def _warn_security(self) -> None:
        if self.broker.tls is None:
            log.warning("MQTT to %s:%s WITHOUT TLS: anyone on the network can read and forge "
                        "traffic; only for the local demo (set [broker.tls] for a federation)",
                        self.broker.host, self.broker.port)
        else:
            from agent.security.pki import WARN_DAYS

            left = self.cert_days_left()
            if left is not None and left < WARN_DAYS:
                log.warning("certificate %s expires in %.0f days: ask the federation for a new "
                            "one", self.broker.tls.cert, left)

    def _connect_once(self, timeout_s: float, stop: threading.Event | None) -> bool:
        """One attempt over the protocols allowed: True connected, False `stop` was set;
        BrokerError (BrokerRefused for a terminal CONNACK) otherwise."""
        order = {"5": [True], "3.1.1": [False], "auto": [True, False]}[self.broker.protocol]
        last_error = ""
        self._terminal = None
        for v5 in order:
            self._client = self._make_client(v5)
            self._connected.clear()
            self._last_connack = ""
            try:
                self._socket_connect(v5)
            except OSError as exc:  # refused, unreachable, TLS handshake (ssl.SSLError)
                raise BrokerError(self._unreachable(exc)) from None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not self._connected.is_set():
                if stop is not None and stop.is_set():
                    self._client.disconnect()
                    return False
                rc = self._client.loop(timeout=0.05)
                if self._terminal or (rc != mqtt.MQTT_ERR_SUCCESS and not self._connected.is_set()):
                    break
            if self._connected.is_set():
                self.protocol_used = "5" if v5 else "3.1.1"
                self._thread = threading.Thread(target=self._network_loop,
                                                name=f"mqtt-{self.client_id}", daemon=True)
                self._thread.start()
                return True
            last_error = self._terminal or self._last_connack or "no CONNACK before timeout"
            if self._terminal:
                break
            self._client.disconnect()
        error = BrokerRefused if self._terminal else BrokerError
        raise error(f"MQTT broker {self.broker.host}:{self.broker.port} refused "
                    f"{self.client_id}: {last_error}")

    def _unreachable(self, exc: OSError) -> str:
        """Why the broker cannot be reached, naming the proxy when it was the one that said no
        (PySocks' errors are OSErrors: "Socket error: 407: Proxy Authentication Required")."""
        scheme = self.broker.scheme
        where = f"{self.broker.host}:{self.broker.port}" + (f" ({scheme})" if scheme != "mqtt"
                                                            else "")
        proxy = self.broker.proxy
        if proxy is not None and type(exc).__module__ == "socks":
            reason = str(exc).removeprefix("Socket error: ").strip() or type(exc).__name__
            hint = (" (the proxy wants other credentials: check [broker.proxy] auth_file)"
                    if reason[:3] in ("401", "407") else "")
            return f"proxy {proxy} did not open a tunnel to {where}: {reason}{hint}"
        via = f" via proxy {proxy}" if proxy is not None else ""
        return f"cannot reach MQTT broker {where}{via}: {exc.strerror or exc}"

    def _socket_connect(self, v5: bool) -> None:
        assert self._client is not None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive_s,
                                 clean_start=False, properties=props)
        else:
            self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive_s)

    # ------------------------------------------------------------------ paho callbacks

    def _drain_before_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """On a clean stop, let the broker read our DISCONNECT before the socket closes.

        paho closes the socket right after writing DISCONNECT. If messages for us are still
        unread in the kernel at that moment, Linux answers with a reset, the broker drops the
        unread DISCONNECT with it, and publishes our will: monitoring would see
        "connection_lost" for a clean stop (seen under load). So: half-close, read until the
        broker closes its side (it does once it has read DISCONNECT), then let paho close.
        """
        if not self._closing:
            return
        sock = _unwrapped(sock)
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_S
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                try:
                    if not sock.recv(65536):
                        break  # the broker closed: it has read DISCONNECT
                except BlockingIOError:
                    continue
        except (OSError, ValueError, AttributeError):
            pass  # already gone: nothing left to protect

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._last_connack = str(reason_code)
            if str(reason_code) in _TERMINAL_REASONS:
                self._terminal = str(reason_code)
            return
        self.connects += 1
        _disable_nagle(client)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        log.info("connected to %s:%s as %s", self.broker.host, self.broker.port, self.client_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stop.is_set():
            log.warning("disconnected from broker (%s); will reconnect", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # raised here, it would end the network thread
            # Queued all the same so that it is acknowledged; no fedsilo topic looks like this,
            # so the receiver refuses it by name.
            topic = bytes(getattr(msg, "_topic", b"")).decode("utf-8", "replace")
        payload = bytes(msg.payload)
        with self._inbox_lock:
            self.inbox_bytes += len(payload)
        self.inbox.put(Incoming(topic, payload, bool(msg.retain), msg.mid, msg.qos,
                                self.connects))

    def receive(self, timeout_s: float) -> Incoming:
        """The next incoming message (queue.Empty after `timeout_s`), acknowledged to the
        broker now that the main loop has taken it: the broker then sends the next one."""
        msg = self.inbox.get(timeout=timeout_s)
        with self._inbox_lock:
            self.inbox_bytes -= len(msg.payload)
        self._wake.set()
        client = self._client
        if msg.qos > 0 and client is not None and msg.connection == self.connects:
            client.ack(msg.mid, msg.qos)  # queued; the network thread writes it
        return msg

    # ------------------------------------------------------------------ network thread

    def inbox_full(self) -> bool:
        """True while the main loop has `inbox_max_bytes` / `inbox_max_messages` to take
        and is not waiting for its own publishes' acknowledgements."""
        if self._awaiting_acks:
            return False
        with self._inbox_lock:
            held = self.inbox_bytes
        return held >= self.inbox_max_bytes or self.inbox.qsize() >= self.inbox_max_messages

    def _loop_once(self, paused: bool) -> int:
        """One turn of the network thread: paho's whole loop, or, with a full inbox,
        everything but reading (queued writes, keepalive) until woken."""
        assert self._client is not None
        if not paused:
            return self._client.loop(timeout=0.05)
        self._wake.clear()
        rc = mqtt.MQTT_ERR_SUCCESS
        if self._client.want_write():
            rc = self._client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = self._client.loop_misc()
        if rc == mqtt.MQTT_ERR_SUCCESS and not self._client.want_write():
            self._wake.wait(0.05)
        return rc

    def _network_loop(self) -> None:
        assert self._client is not None
        attempt = 0
        paused = False
        while not self._stop.is_set():
            if self._connected.is_set() or self._client.is_connected():
                full = self.inbox_full()
                if full and not paused:
                    self.read_pauses += 1
                    log.debug("inbox full (%d bytes): reading paused", self.inbox_bytes)
                paused = full
                rc = self._loop_once(paused)
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    attempt = 0
                    continue
                self._connected.clear()
            if self._terminal:
                log.error("broker refused %s: %s; not retrying", self.client_id, self._terminal)
                return
            delay = backoff_delay(attempt, self.reconnect_base_s, self.reconnect_cap_s, self._rng)
            attempt += 1
            if self._stop.wait(delay):
                return
            try:
                self._client.reconnect()
                deadline = time.monotonic() + 10
                while (time.monotonic() < deadline and not self._connected.is_set()
                       and not self._stop.is_set()):
                    if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
            except OSError as exc:
                log.info("reconnect attempt %d failed: %s", attempt, exc.strerror or exc)

    # ------------------------------------------------------------------ API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                expiry_s: float | None = None) -> mqtt.MQTTMessageInfo:
        if self._client is None:
            raise BrokerError("publish before connect")
        props = None
        if expiry_s is not None and self.protocol_used == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, int(expiry_s))
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        # a small message: its PUBACK times the path
        sent = time.monotonic() if len(payload) <= RTT_MAX_BYTES else None
        with self._in_flight_lock:
            self._in_flight[info.mid] = (topic, sent)
            while len(self._in_flight) > 256:  # acks lost with a connection
                del self._in_flight[next(iter(self._in_flight))]
        return info

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any = None,
                    properties: Any = None) -> None:
        """PUBACK of a publish: for a small one, the round trip to the broker and back; a
        refusal (MQTT 5 reason code, e.g. Not authorized from the ACL) is counted and named:
        under 3.1.1 the broker acknowledges and drops such a publish without a word."""
        with self._in_flight_lock:
            topic, sent = self._in_flight.pop(mid, ("?", None))
        if sent is not None:
            self.last_rtt_ms = round((time.monotonic() - sent) * 1000.0, 1)
        if reason is not None and getattr(reason, "is_failure", False):
            self.publishes_refused += 1
            self.last_refusal = f"{reason} on {topic}"
            log.warning("the broker refused our publish to %s (%s): check its ACL for %s",
                        topic, reason, self.client_id)

    def wait_published(self, infos: Iterable[mqtt.MQTTMessageInfo], timeout_s: float) -> None:
        """Block until the broker acknowledged every publish; a timeout is a failure.

        A publish made while the connection was down is queued by paho and sent after the
        reconnect, but its `rc` stays NO_CONN and paho's own wait raises; so we wait on the
        acknowledgement flag itself.
        """
        deadline = time.monotonic() + timeout_s
        with self._inbox_lock:  # the PUBACKs may sit behind messages a full inbox left unread
            self._awaiting_acks += 1
        self._wake.set()
        try:
            for info in infos:
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    raise BrokerError(f"publish failed: {mqtt.error_string(info.rc)}")
                with info._condition:  # paho 2.x: set with _published on PUBACK
                    while not info._published:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise BrokerError(
                                f"publish not acknowledged within {timeout_s:.0f} s")
                        info._condition.wait(min(remaining, 0.5))
        finally:
            with self._inbox_lock:
                self._awaiting_acks -= 1

    def close(self, final: tuple[str, bytes] | None = None, timeout_s: float = 5.0) -> None:
        """Publish a last retained message (the explicit offline status), then disconnect."""
        if self._client is None:
            return
        if final is not None and self.connected:
            try:
                self.wait_published([self.publish(final[0], final[1], retain=True)], timeout_s)
            except BrokerError as exc:
                log.warning("could not publish final status: %s", exc)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        # A clean DISCONNECT makes the broker discard the will; if the socket closed before it
        # was flushed, monitoring would see "connection_lost" for a clean stop.
        self._closing = True
        self._client.disconnect()
        deadline = time.monotonic() + timeout_s
        while self._client.socket() is not None and time.monotonic() < deadline:
            if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        self._client = None

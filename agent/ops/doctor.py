"""`fedsilo doctor`: the site's path to the broker checked one step at a time, stopping at the
first failure with words an IT admin can act on.

Why step by step: "cannot reach the broker" has a dozen causes on a hospital network (a name
the resolver does not know, a firewall, a proxy that wants credentials or refuses the port, a
TLS inspection box, an expired certificate). Each step here uses only what the one before it
proved, so the first failure names the layer to fix.

Last come the MQTT session and the broker's ACL, only while the agent is stopped: the broker
makes a site's certificate its client id, so a second connection would push the running agent
off. The agent holds `<state_dir>/agent.lock` while it runs; when it does, those two steps are
skipped and its status (reconnects, publishes_refused, last_rtt_ms) is the place to look. The
ACL probe publishes on `site/<id>/doctor`, inside the site's write ACL and read by nobody, and
waits for the coordinator's retained status, which the site's read ACL must let through. The
session resumed is the agent's own (same client id, no clean start); nothing in it is
acknowledged, so whatever the broker queued for the agent is delivered to it again later.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import queue
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config.site import BrokerConfig, SiteConfig, load_site_config
from agent.errors import BrokerError, ConfigError
from agent.federation import topics
from agent.federation.transport import Transport
from agent.ops.statedir import AGENT_LOCK, agent_lock_holder

TIMEOUT_S = 10.0
STATUS_WAIT_S = 5.0  # for the coordinator's retained status, once subscribed


class StepFailed(Exception):
    """One step failed; the message says what to do."""


class StepSkipped(Exception):
    """The rest cannot be checked from here now (the agent runs); not a failure."""


class StepWarned(Exception):
    """The step passed only in part; the message says what may be wrong. Not a failure."""


def _dns(host: str, what: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StepFailed(f"{what} {host!r} does not resolve ({exc.strerror}): check the name in "
                         f"the config, or this host's DNS (/etc/resolv.conf)") from None
    return ", ".join(sorted({i[4][0] for i in infos}))


def _tcp(host: str, port: int, what: str) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=TIMEOUT_S)
    except TimeoutError:
        raise StepFailed(f"no answer from {what} {host}:{port} within {TIMEOUT_S:.0f} s: a "
                         f"firewall drops the traffic; ask for outbound TCP to it") from None
    except OSError as exc:
        raise StepFailed(f"{what} {host}:{port} refused or unreachable ({exc.strerror}): check "
                         f"host and port, and that it runs") from None


def _tunnel(sock: socket.socket, broker: BrokerConfig) -> str:
    """HTTP CONNECT through the proxy to the broker; the proxy's answer line."""
    proxy = broker.proxy
    assert proxy is not None
    lines = [f"CONNECT {broker.host}:{broker.port} HTTP/1.1", f"Host: {broker.host}:{broker.port}"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer and len(answer) < 16384:
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    status = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace").strip()
    parts = status.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        hint = {"401": "it wants other credentials: check [broker.proxy] auth_file",
                "407": "it wants credentials: set [broker.proxy] auth_file",
                "403": f"it forbids the port: ask IT to allow CONNECT to {broker.port}"}.get(
                    parts[1] if len(parts) > 1 else "", "ask IT what the proxy allows")
        raise StepFailed(f"proxy {proxy} refused the tunnel to {broker.host}:{broker.port}: "
                         f"{status or 'no answer'} ({hint})")
    return status


def _tls(sock: socket.socket, broker: BrokerConfig) -> str:
    tls = broker.tls
    assert tls is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    try:
        wrapped = ctx.wrap_socket(sock, server_hostname=broker.host)
    except ssl.SSLCertVerificationError as exc:
        raise StepFailed(f"the broker's certificate does not verify against {tls.ca}: "
                         f"{exc.verify_message}; a TLS-inspecting proxy or the wrong CA file "
                         f"(ask IT to exempt {broker.host} from inspection)") from None
    except (ssl.SSLError, OSError) as exc:
        raise StepFailed(f"TLS handshake with {broker.host}:{broker.port} failed "
                         f"({getattr(exc, 'reason', None) or exc}); the broker may refuse our "
                         f"certificate, or speak no TLS on this port") from None
    version = wrapped.version()
    wrapped.close()
    return f"{version}, the broker's certificate verifies against {tls.ca}"


def _certificate(config: SiteConfig) -> str:
    from agent.security.identity import check_identity

    files = config.identity
    tls = config.broker.tls
    ca, cert, key, crl = (files.ca, files.cert, files.key, files.crl) if files else \
        (tls.ca, tls.cert, tls.key, None) if tls else (None, None, None, None)
    if cert is None:
        raise StepFailed("no certificate configured ([broker.tls] or [identity]): a federation "
                         "broker accepts only sites with one")
    try:
        check_identity(config.source, "broker.tls" if files is None else "identity", ca, cert,
                       key, crl, config.site_id, "site")
    except ConfigError as exc:
        raise StepFailed(str(exc)) from None
    from agent.security.pki import days_left

    left = days_left(cert, dt.datetime.now(dt.timezone.utc))
    return f"{cert}: site {config.site_id}, valid {left:.0f} more days"


def _agent_stopped(config: SiteConfig) -> str:
    lock = config.state_dir / AGENT_LOCK
    try:
        pid = agent_lock_holder(config.state_dir)
    except OSError as exc:
        raise StepSkipped(f"cannot tell whether the agent runs ({exc.strerror}: {lock}); run "
                          f"doctor as the service's user to check the MQTT session and ACL"
                          ) from None
    if pid is not None:
        raise StepSkipped(f"the agent runs (pid {pid} holds {lock}): a second session with its "
                          f"certificate would push it off; its status shows its session "
                          f"(reconnects, publishes_refused, last_rtt_ms), or stop it to check "
                          f"the session and the ACL from here")
    return f"not running ({config.state_dir}): its MQTT session is free to test"


def _session(config: SiteConfig) -> Transport:
    fed, site = config.federation, config.site_id
    transport = Transport(f"fedsilo-{fed}-site-{site}", config.broker,
                          subscriptions=[topics.coordinator_status(fed)])
    try:
        transport.connect(timeout_s=TIMEOUT_S)
    except BrokerError as exc:
        raise StepFailed(f"{exc}: the broker took the connection but not the MQTT session "
                         f"(a certificate it does not know, or MQTT not served on "
                         f"{config.broker.scheme}://{config.broker.host}:{config.broker.port})"
                         ) from None
    return transport


def _coordinator_status(transport: Transport, fed: str, wait_s: float) -> dict[str, Any] | None:
    """The coordinator's status, as the site's read ACL lets it through: the newest of what
    arrives (a resumed session may first redeliver older ones). Read from the inbox without
    acknowledging anything: those messages stay the agent's."""
    want = topics.coordinator_status(fed)
    deadline = time.monotonic() + wait_s
    found: dict[str, Any] | None = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = transport.inbox.get(timeout=left)
        except queue.Empty:
            break
        if msg.topic == want and msg.payload:
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                doc = {}
            found = doc if isinstance(doc, dict) else {}
            deadline = min(deadline, time.monotonic() + 0.5)  # newer ones come right behind
    return found


def _acl(config: SiteConfig, transport: Transport) -> str:
    fed, site = config.federation, config.site_id
    probe = topics.site_doctor(fed, site)
    try:
        transport.wait_published([transport.publish(probe, b"fedsilo doctor")], TIMEOUT_S)
    except BrokerError as exc:
        raise StepFailed(f"the broker did not acknowledge a publish to {probe} ({exc})") from None
    if transport.last_refusal is not None:
        raise StepFailed(f"the broker refuses {site}'s publishes ({transport.last_refusal}): "
                         f"its ACL has no rules for this identity; ask the broker's admin to "
                         f"add {site} to the federation's roster (fedsilo broker-config "
                         f"--sites) and reload the broker")
    wrote = (f"may publish under {topics.root(fed)}/site/{site}/" if
             transport.protocol_used == "5" else
             "publish acknowledged (MQTT 3.1.1 cannot say whether the ACL let it through)")
    status = _coordinator_status(transport, fed, STATUS_WAIT_S)
    if status is None:
        raise StepWarned(f"{wrote}; but no coordinator status arrived within "
                         f"{STATUS_WAIT_S:.0f} s: the coordinator has not run yet, or the "
                         f"broker's ACL does not let {site} read "
                         f"{topics.coordinator_status(fed)}, or messages queued for the stopped "
                         f"agent came first (they are left for it)")
    return (f"{wrote}; reads the coordinator's status ({status.get('state', '?')}, round "
            f"{status.get('round', '?')})")


def run_doctor(config_path: Path, say: Callable[[str], None] = print) -> int:
    """0 when every step passed (or the rest was skipped because the agent runs), 1 at the
    first failure (printed with what to do)."""
    config = load_site_config(config_path)  # ConfigError: exit 2, as for any command
    b = config.broker
    steps: list[tuple[str, Callable[[], str]]] = [("certificate", lambda: _certificate(config))]
    first = b.proxy.host if b.proxy else b.host
    steps.append(("dns", lambda: f"{first} is {_dns(first, 'proxy' if b.proxy else 'broker')}"))
    held: dict[str, Any] = {}

    def tcp() -> str:
        host, port = (b.proxy.host, b.proxy.port) if b.proxy else (b.host, b.port)
        held["sock"] = _tcp(host, port, "proxy" if b.proxy else "broker")
        return f"connected to {host}:{port}"

    def mqtt() -> str:
        held["sock"].close()  # the session makes its own connection, through the same path
        held["mqtt"] = _session(config)
        return f"session accepted as {config.site_id} (MQTT {held['mqtt'].protocol_used})"

    steps.append(("tcp", tcp))
    if b.proxy is not None:
        steps.append(("proxy", lambda: _tunnel(held["sock"], b)))
    if b.tls is not None:
        steps.append(("tls", lambda: _tls(held["sock"], b)))
    steps += [("agent", lambda: _agent_stopped(config)), ("mqtt", mqtt),
              ("acl", lambda: _acl(config, held["mqtt"]))]
    url = f"{b.scheme}://{b.host}:{b.port}"
    warned = False
    try:
        for name, step in steps:
            try:
                detail = step()
            except StepFailed as exc:
                say(f"FAIL  {name:<11} {exc}")
                return 1
            except StepSkipped as exc:
                say(f"skip  {name:<11} {exc}")
                say(f"the path to {url} works up to the broker's TLS; the session and the "
                    f"ACL were not checked (see above)")
                return 0
            except StepWarned as exc:
                say(f"warn  {name:<11} {exc}")
                warned = True
                continue
            say(f"ok    {name:<11} {detail}")
    finally:
        if "sock" in held:
            held["sock"].close()
        if "mqtt" in held:
            held["mqtt"].close()
    say(f"the path to {url} works: this site can connect and publish; reading is not proven "
        f"(see the warning)" if warned else
        f"the path to {url} works: this site can connect, publish and read; start the agent")
    return 0

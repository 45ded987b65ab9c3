"""`fedsilo doctor`: the site's path to the broker checked one step at a time, stopping at the
first failure with words an IT admin can act on.

Why step by step: "cannot reach the broker" has a dozen causes on a hospital network (a name
the resolver does not know, a firewall, a proxy that wants credentials or refuses the port, a
TLS inspection box, an expired certificate). Each step here uses only what the one before it
proved, so the first failure names the layer to fix.

The MQTT session itself is not opened: the broker identifies a site by its certificate, so a
second connection with it would take over the running agent's session.
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from agent.config.site import BrokerConfig, SiteConfig, load_site_config
from agent.errors import ConfigError

TIMEOUT_S = 10.0


class StepFailed(Exception):
    """One step failed; the message says what to do."""


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


def run_doctor(config_path: Path, say: Callable[[str], None] = print) -> int:
    """0 when every step passed, 1 at the first failure (printed with what to do)."""
    config = load_site_config(config_path)  # ConfigError: exit 2, as for any command
    b = config.broker
    steps: list[tuple[str, Callable[[], str]]] = [("certificate", lambda: _certificate(config))]
    first = b.proxy.host if b.proxy else b.host
    steps.append(("dns", lambda: f"{first} is {_dns(first, 'proxy' if b.proxy else 'broker')}"))
    held: dict[str, socket.socket] = {}

    def tcp() -> str:
        host, port = (b.proxy.host, b.proxy.port) if b.proxy else (b.host, b.port)
        held["sock"] = _tcp(host, port, "proxy" if b.proxy else "broker")
        return f"connected to {host}:{port}"

    steps.append(("tcp", tcp))
    if b.proxy is not None:
        steps.append(("proxy", lambda: _tunnel(held["sock"], b)))
    if b.tls is not None:
        steps.append(("tls", lambda: _tls(held["sock"], b)))
    try:
        for name, step in steps:
            try:
                detail = step()
            except StepFailed as exc:
                say(f"FAIL  {name:<11} {exc}")
                return 1
            say(f"ok    {name:<11} {detail}")
    finally:
        if "sock" in held:
            held["sock"].close()
    say(f"the path to {b.scheme}://{b.host}:{b.port} works up to the broker's TLS; the MQTT "
        f"session is the running agent's (see its status)")
    return 0

"""Site and coordinator configs: identity, broker, state directory, data and DICOM sources."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.checks import (
    COLUMN_PATTERN,
    FEDERATION_ID_PATTERN,
    PROFILE_NAME_PATTERN,
    SITE_ID_PATTERN,
    _path,
    _read_toml,
    _Reader,
)
from agent.ops.throttle import TrainingPolicy, parse_hours

MQTT_PROTOCOLS = ("auto", "5", "3.1.1")
MQTT_TRANSPORTS = ("tcp", "websockets")


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class IdentityFiles:
    """Whose key signs our manifests, and the CA (and CRL) that must vouch for our peers'.
    Defaults to the [broker.tls] files when only those are given."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None


@dataclass(frozen=True)
class ProxyConfig:
    """[broker.proxy]: an HTTP CONNECT proxy between the site and the broker (hospital
    networks often allow nothing else out). Credentials come from a file, never the config."""

    host: str
    port: int = 3128
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    protocol: str = "auto"
    tls: TLSFiles | None = None
    transport: str = "tcp"  # or "websockets" (wss with [broker.tls]): MQTT over port 443
    ws_path: str = "/mqtt"
    proxy: ProxyConfig | None = None

    @property
    def scheme(self) -> str:
        """How the broker is reached, for people: mqtt, mqtts, ws or wss."""
        secure = self.tls is not None
        return ("wss" if secure else "ws") if self.transport == "websockets" else \
            ("mqtts" if secure else "mqtt")


@dataclass(frozen=True)
class DataSources:
    table: Path | None = None
    id_column: str | None = None
    holdout_fraction: float = 0.2
    split_seed: int = 0


@dataclass(frozen=True)
class DicomSources:
    """Where images come from: a C-STORE listener and/or a watch folder (both optional)."""

    listen: bool = False
    ae_title: str = "FEDSILO"
    port: int = 11112
    bind: str = "0.0.0.0"
    allowed_callers: tuple[str, ...] = ()
    watch_dir: Path | None = None
    series_quiet_s: float = 30.0
    queue_files: int = 1000  # received files waiting for the ingest thread, at most
    incoming_max_bytes: int = 10 << 30  # received, not yet ingested (state_dir/incoming)
    quarantine_max_bytes: int = 5 << 30  # files kept for a person to look at


@dataclass(frozen=True)
class SitePrivacy:
    """[privacy] in a site config: what this hospital agrees to, whatever a plan asks.

    Empty allow-lists accept any feature or model kind. `min_cell` raises (never lowers) the
    plan's minimum cohort. `require_secure_aggregation` and `max_epsilon` refuse plans that
    would show the coordinator single updates, or spend more privacy than the hospital's
    data-protection officer agreed to (a plan without DP then is refused too)."""

    allowed_features: tuple[str, ...] = ()
    allowed_model_kinds: tuple[str, ...] = ()
    min_cell: int = 10
    require_secure_aggregation: bool = False
    max_epsilon: float | None = None


@dataclass(frozen=True)
class PacsNode:
    """[results.pacs]: where result SRs go (C-STORE, agent.results.pacs): the PACS's called AE
    title and address, and our calling AE title."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "FEDSILO"
    timeout_s: float = 30.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ResultsConfig:
    """[results]: score newly completed series with the federation's exported model (kept in
    <state_dir>/model/), and optionally send each result to the PACS as a DICOM SR."""

    score: bool = False
    model_dir: Path | None = None  # default <state_dir>/model
    pacs: PacsNode | None = None
    retry_s: float = 300.0  # a result the PACS did not take is sent again after this long


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    federation: str
    state_dir: Path
    broker: BrokerConfig
    data: DataSources
    hardware_profile: str = "auto"
    dicom: DicomSources = field(default_factory=DicomSources)
    source: str = ""
    identity: IdentityFiles | None = None
    home_assistant_discovery: bool = False  # [monitoring]: announce sensors to Home Assistant
    policy: TrainingPolicy = field(default_factory=TrainingPolicy)  # [policy]: yield to clinics
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    results: ResultsConfig = field(default_factory=ResultsConfig)


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    broker: BrokerConfig
    coordinator_id: str = "coordinator"
    source: str = ""
    identity: IdentityFiles | None = None


# ---------------------------------------------------------------------------- checked reads



def _broker(file: str, r: _Reader | None, base: Path) -> BrokerConfig:
    if r is None:
        return BrokerConfig()
    r.reject_unknown({"host", "port", "keepalive_s", "protocol", "tls", "transport", "ws_path",
                      "proxy"})
    tls = None
    t = r.sub("tls")
    if t is not None:
        t.reject_unknown({"ca", "cert", "key"})
        tls = TLSFiles(**_files(t, ("ca", "cert", "key"), base))
    transport = r.choice("transport", MQTT_TRANSPORTS, "tcp")
    ws_path = r.get("ws_path", str, "/mqtt")
    if not ws_path.startswith("/") or not ws_path.isprintable() or " " in ws_path:
        raise r.fail("ws_path", f"{ws_path!r} must be a URL path starting with /")
    host = r.get("host", str, "127.0.0.1")
    return BrokerConfig(
        host=host,
        port=r.number("port", 443 if transport == "websockets" else 1883, lo=1, hi=65535,
                      integer=True),
        keepalive_s=r.number("keepalive_s", 30, lo=5, hi=60, integer=True),
        protocol=r.choice("protocol", MQTT_PROTOCOLS, "auto"),
        tls=tls, transport=transport, ws_path=ws_path,
        proxy=_proxy(r.sub("proxy"), base, host),
    )


def _proxy(r: _Reader | None, base: Path, broker_host: str) -> ProxyConfig | None:
    """[broker.proxy]: host/port, or from_env = true for HTTPS_PROXY (and NO_PROXY)."""
    if r is None:
        return None
    r.reject_unknown({"host", "port", "auth_file", "from_env"})
    user = password = None
    auth = r.get("auth_file", str, None)
    if auth is not None:
        path = _path(base, auth)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise r.fail("auth_file", f"{path}: cannot be read ({exc})") from None
        user, sep, password = text.partition(":")
        if not sep or not user or "\n" in text:
            raise r.fail("auth_file", f"{path}: must hold one line user:password")
    if r.get("from_env", bool, False):
        if "host" in r.table or "port" in r.table:
            raise r.fail("from_env", "give host and port, or from_env = true, not both")
        try:
            found = proxy_from_env(broker_host)
        except ValueError as exc:
            raise r.fail("from_env", str(exc)) from None
        if found is None:
            return None  # NO_PROXY names the broker, or no HTTPS_PROXY is set: direct
        host, port, env_user, env_password = found
        return ProxyConfig(host, port, user or env_user, password or env_password)
    return ProxyConfig(r.get("host", str, required=True),
                       r.number("port", 3128, lo=1, hi=65535, integer=True), user, password)


def proxy_from_env(broker_host: str, environ: dict[str, str] | None = None
                   ) -> tuple[str, int, str | None, str | None] | None:
    """HTTPS_PROXY (or https_proxy) as (host, port, user, password), unless NO_PROXY (or
    no_proxy) names the broker host, a domain suffix of it, or "*"."""
    import os
    from urllib.parse import unquote, urlsplit

    env = os.environ if environ is None else environ
    value = env.get("HTTPS_PROXY") or env.get("https_proxy")
    if not value:
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    host = broker_host.lower().rstrip(".")
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    url = urlsplit(value if "://" in value else f"http://{value}")
    if not url.hostname:
        raise ValueError(f"HTTPS_PROXY {value!r} names no host")
    return (url.hostname, url.port or 3128, unquote(url.username) if url.username else None,
            unquote(url.password) if url.password else None)


def _files(r: _Reader, names: tuple[str, ...], base: Path, required: bool = True
           ) -> dict[str, Path]:
    files = {}
    for name in names:
        value = r.get(name, str, ... if required else None)
        if value is None:
            continue
        p = _path(base, value)
        if not p.is_file():
            raise r.fail(name, f"file {p} does not exist")
        files[name] = p
    return files


def _identity(r: _Reader | None, base: Path) -> IdentityFiles | None:
    """[identity]: ca, cert, key (and crl). Without it the TLS client identity signs
    (`Trust.load`)."""
    if r is None:
        return None
    r.reject_unknown({"ca", "cert", "key", "crl"})
    return IdentityFiles(**_files(r, ("ca", "cert", "key"), base),
                         **_files(r, ("crl",), base, required=False))


def _hardware_profile_name(s: _Reader) -> str:
    """"auto" or a profile name; whether that profile exists is checked by `check_file` and at
    site start, against the profile directory in use."""
    value = s.get("hardware_profile", str, "auto")
    if value != "auto" and not PROFILE_NAME_PATTERN.fullmatch(value):
        raise s.fail("hardware_profile", f'{value!r} is neither "auto" nor a valid profile name '
                                         f"(pattern {PROFILE_NAME_PATTERN.pattern})")
    return value


def load_site_config(path: str | Path) -> SiteConfig:
    path = Path(path)
    file = str(path)
    doc = _read_toml(path)
    top = _Reader(file, doc, "")
    top.reject_unknown({"site", "broker", "data", "dicom", "identity", "monitoring", "policy",
                        "privacy", "results"})
    mon = top.sub("monitoring")
    if mon is not None:
        mon.reject_unknown({"home_assistant_discovery"})
    s = top.sub("site", required=True)
    s.reject_unknown({"id", "federation", "state_dir", "hardware_profile"})
    base = path.parent
    d = top.sub("data")
    data = DataSources()
    if d is not None:
        d.reject_unknown({"table", "id_column", "holdout_fraction", "split_seed"})
        table = d.get("table", str, None)
        table_path = _path(base, table) if table else None
        if table_path is not None and table_path.suffix.lower() not in (".csv", ".parquet"):
            raise d.fail("table", f"{table_path.name}: expected a .csv or .parquet file")
        id_column = d.get("id_column", str, None)
        if id_column is not None and not COLUMN_PATTERN.fullmatch(id_column):
            raise d.fail("id_column", f"{id_column!r} is not a valid column name")
        data = DataSources(
            table=table_path,
            id_column=id_column,
            holdout_fraction=d.number("holdout_fraction", 0.2, lo=0.05, hi=0.5),
            split_seed=d.number("split_seed", 0, lo=0, integer=True),
        )
    return SiteConfig(
        site_id=s.pattern("id", SITE_ID_PATTERN, "site id", ...),
        federation=s.pattern("federation", FEDERATION_ID_PATTERN, "federation id", ...),
        state_dir=_path(base, s.get("state_dir", str, required=True)),
        broker=_broker(file, top.sub("broker"), base),
        identity=_identity(top.sub("identity"), base),
        data=data,
        hardware_profile=_hardware_profile_name(s),
        dicom=_dicom(top.sub("dicom"), base),
        home_assistant_discovery=(mon.get("home_assistant_discovery", bool, False)
                                  if mon is not None else False),
        policy=_policy(top.sub("policy")),
        privacy=_site_privacy(top.sub("privacy")),
        results=_results(top.sub("results"), base, d, top.sub("dicom")),
        source=file,
    )


def _results(r: _Reader | None, base: Path, data: _Reader | None, dicom: _Reader | None
             ) -> ResultsConfig:
    if r is None:
        return ResultsConfig()
    r.reject_unknown({"score", "model_dir", "pacs", "retry_s"})
    score = r.get("score", bool, False)
    model_dir = r.get("model_dir", str, None)
    pacs = None
    p = r.sub("pacs")
    if p is not None:
        p.reject_unknown({"ae_title", "host", "port", "calling_ae_title", "timeout_s"})
        if not score:
            raise r.fail("pacs", "results go to the PACS only when they are made: set "
                                 "score = true")
        host = p.get("host", str, required=True).strip()
        if not host:
            raise p.fail("host", "must name the PACS host")
        pacs = PacsNode(
            ae_title=_ae_title(p, p.get("ae_title", str, required=True), "ae_title"),
            host=host, port=p.number("port", 104, lo=1, hi=65535, integer=True),
            calling_ae_title=_ae_title(p, p.get("calling_ae_title", str, "FEDSILO"),
                                       "calling_ae_title"),
            timeout_s=p.number("timeout_s", 30.0, lo=1.0, hi=600.0))
    if score and (dicom is None or not (dicom.get("listen", bool, False)
                                        or dicom.get("watch_dir", str, None))):
        raise r.fail("score", "scores series as they arrive: needs [dicom] listen = true or "
                              "a watch_dir")
    if score and (data is None or data.get("id_column", str, None) is None):
        raise r.fail("score", "needs [data] table and id_column: a series is scored with its "
                              "patient's clinical row, joined by id")
    return ResultsConfig(score=score, model_dir=_path(base, model_dir) if model_dir else None,
                         pacs=pacs, retry_s=r.number("retry_s", 300.0, lo=5.0, hi=86400.0))


def _site_privacy(r: _Reader | None) -> SitePrivacy:
    if r is None:
        return SitePrivacy()
    r.reject_unknown({"allowed_features", "allowed_model_kinds", "min_cell",
                      "require_secure_aggregation", "max_epsilon"})
    features = r.get("allowed_features", list, [])
    if not all(isinstance(f, str) and COLUMN_PATTERN.fullmatch(f) for f in features):
        raise r.fail("allowed_features", "must be a list of column names")
    kinds = r.get("allowed_model_kinds", list, [])
    if not all(isinstance(k, str) and k for k in kinds):
        raise r.fail("allowed_model_kinds", "must be a list of model kind names")
    return SitePrivacy(
        allowed_features=tuple(features), allowed_model_kinds=tuple(kinds),
        min_cell=r.number("min_cell", 10, lo=1, hi=1_000_000, integer=True),
        require_secure_aggregation=r.get("require_secure_aggregation", bool, False),
        max_epsilon=r.number("max_epsilon", None, lo=1e-3, hi=1e4))


def _policy(r: _Reader | None) -> TrainingPolicy:
    if r is None:
        return TrainingPolicy()
    r.reject_unknown({"training_hours", "busy_cpu_percent"})
    hours = r.get("training_hours", str, None)
    try:
        window = parse_hours(hours) if hours else None
    except ValueError as exc:
        raise r.fail("training_hours", str(exc)) from None
    return TrainingPolicy(training_hours=window,
                          busy_cpu_percent=r.number("busy_cpu_percent", 0.0, lo=0, hi=100))


AE_TITLE_PATTERN = re.compile(r"^[ -~]{1,16}$")  # DICOM AE: 16 printable ASCII, no backslash


def _ae_title(r: _Reader, value: Any, key: str) -> str:
    if not isinstance(value, str) or not AE_TITLE_PATTERN.fullmatch(value) or "\\" in value \
            or not value.strip():
        raise r.fail(key, f"{value!r} is not a valid AE title (1-16 printable ASCII characters)")
    return value.strip()


def _dicom(r: _Reader | None, base: Path) -> DicomSources:
    if r is None:
        return DicomSources()
    r.reject_unknown({"listen", "ae_title", "port", "bind", "allowed_callers", "watch_dir",
                      "series_quiet_s", "queue_files", "incoming_max_bytes",
                      "quarantine_max_bytes"})
    callers = r.get("allowed_callers", list, [])
    watch = r.get("watch_dir", str, None)
    return DicomSources(
        listen=r.get("listen", bool, False),
        ae_title=_ae_title(r, r.get("ae_title", str, "FEDSILO"), "ae_title"),
        port=r.number("port", 11112, lo=1, hi=65535, integer=True),
        bind=r.get("bind", str, "0.0.0.0"),
        allowed_callers=tuple(_ae_title(r, c, "allowed_callers") for c in callers),
        watch_dir=_path(base, watch) if watch else None,
        series_quiet_s=r.number("series_quiet_s", 30.0, lo=0.0, hi=86400.0),
        queue_files=r.number("queue_files", 1000, lo=1, hi=1_000_000, integer=True),
        incoming_max_bytes=r.number("incoming_max_bytes", 10 << 30, lo=1 << 20, hi=1 << 50,
                                    integer=True),
        quarantine_max_bytes=r.number("quarantine_max_bytes", 5 << 30, lo=0, hi=1 << 50,
                                      integer=True),
    )


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    path = Path(path)
    file = str(path)
    top = _Reader(file, _read_toml(path), "")
    top.reject_unknown({"coordinator", "broker", "identity"})
    c = top.sub("coordinator", required=True)
    c.reject_unknown({"state_dir", "id"})
    return CoordinatorConfig(
        state_dir=_path(path.parent, c.get("state_dir", str, required=True)),
        broker=_broker(file, top.sub("broker"), path.parent),
        identity=_identity(top.sub("identity"), path.parent),
        coordinator_id=c.pattern("id", SITE_ID_PATTERN, "coordinator id", "coordinator"),
        source=file,
    )


"""Checks of what a site or coordinator config *points at*: the table and the identity files.

Loading a config checks its syntax and that named files exist; this opens them. Both
`fedsilo config check` and every daemon start run it, so a wrong key or a missing table stops
the program at once with one line (exit 2), not at the first task.
"""

from __future__ import annotations

from agent.config.site import BrokerConfig, CoordinatorConfig, IdentityFiles, SiteConfig
from agent.errors import ConfigError, DataError


def verify_site(cfg: SiteConfig) -> SiteConfig:
    """The site's table and identity files are usable; returns `cfg`."""
    table = cfg.data.table
    if table is not None:
        from agent.ingest.tables import read_header

        if not table.exists():
            raise ConfigError(cfg.source, "data.table", f"{table} does not exist")
        try:
            read_header(table)
        except DataError as exc:
            raise ConfigError(cfg.source, "data.table", str(exc)) from None
    _verify_identity(cfg.source, cfg.identity, cfg.broker, cfg.site_id, "site")
    return cfg


def verify_coordinator(cfg: CoordinatorConfig) -> CoordinatorConfig:
    """The coordinator's identity files are usable; returns `cfg`. Its certificate is the
    `coordinator` identity whatever `coordinator.id` says: that is the sender peers check on
    coordinator topics (`Trust.load`) and the only coordinator name `fedsilo pki` issues."""
    _verify_identity(cfg.source, cfg.identity, cfg.broker, "coordinator", "coordinator")
    return cfg


def _verify_identity(source: str, identity: IdentityFiles | None, broker: BrokerConfig,
                     name: str, role: str) -> None:
    """[identity] signs, else the [broker.tls] files do (as `Trust.load` decides): those must
    be this process's identity under the CA; TLS files beside an [identity] must be a pair."""
    from agent.security.identity import check_identity, check_pair, load_certificate

    tls = broker.tls
    if identity is not None:
        check_identity(source, "identity", identity.ca, identity.cert, identity.key,
                       identity.crl, name, role)
        if tls is not None:
            check_pair(source, "broker.tls", tls.cert, tls.key)
            load_certificate(tls.ca, (source, "broker.tls.ca"))
    elif tls is not None:
        check_identity(source, "broker.tls", tls.ca, tls.cert, tls.key, None, name, role)

"""Typed site config, coordinator config and federation plan, loaded from TOML.

Which kind a file is follows from its top-level table: `[site]`, `[coordinator]` or
`[federation]`. `checks` holds the shared validation, `plan` the plan, `site` the site and
coordinator configs; everything is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from agent.config.checks import (
    COLUMN_PATTERN,
    FEDERATION_ID_PATTERN,
    PROFILE_NAME_PATTERN,
    SITE_ID_PATTERN,
    _read_toml,
    _Reader,
)
from agent.config.plan import (
    DP_MODES,
    FEATURE_TYPES,
    MISSING_POLICIES,
    OPTIMIZERS,
    QUANTIZERS,
    STRATEGIES,
    STRATEGY_OPTIONS,
    CompressionSpec,
    FeatureSpec,
    ImagingSpec,
    ModelSpec,
    Plan,
    PrivacySpec,
    StrategySpec,
    TrainingSpec,
    load_plan,
    plan_from_dict,
    plan_to_toml_dict,
)
from agent.config.site import (
    MQTT_PROTOCOLS,
    BrokerConfig,
    CoordinatorConfig,
    DataSources,
    DicomSources,
    IdentityFiles,
    SiteConfig,
    SitePrivacy,
    TLSFiles,
    load_coordinator_config,
    load_site_config,
)
from agent.errors import ConfigError

__all__ = [
    "COLUMN_PATTERN", "DP_MODES", "FEATURE_TYPES", "FEDERATION_ID_PATTERN", "MISSING_POLICIES",
    "MQTT_PROTOCOLS", "OPTIMIZERS", "PROFILE_NAME_PATTERN", "SITE_ID_PATTERN",
    "QUANTIZERS", "STRATEGIES", "STRATEGY_OPTIONS", "BrokerConfig", "CompressionSpec",
    "CoordinatorConfig",
    "DataSources", "DicomSources", "IdentityFiles",
    "FeatureSpec", "ImagingSpec", "ModelSpec", "Plan", "PrivacySpec", "SiteConfig", "SitePrivacy",
    "StrategySpec", "TLSFiles",
    "TrainingSpec",
    "_Reader", "_read_toml", "check_file", "load_coordinator_config", "load_plan",
    "load_site_config", "plan_from_dict", "plan_to_toml_dict",
]


def check_file(path: str | Path) -> str:
    """Validate any fedsilo TOML file, and what a config points at (its table, certificates
    and keys: `verify`); returns its kind ('site', 'coordinator' or 'plan')."""
    path = Path(path)
    doc = _read_toml(path)
    from agent.config.verify import verify_coordinator, verify_site

    if "site" in doc:
        site = verify_site(load_site_config(path))
        # Lazy: hardware imports this module. Loading also surfaces a broken profile file.
        from agent.ops.hardware import default_profiles_dir, load_profiles, profile_named

        profiles = load_profiles(default_profiles_dir())
        if site.hardware_profile != "auto":
            profile_named(profiles, site.hardware_profile, source=str(path))
        return "site"
    if "coordinator" in doc:
        verify_coordinator(load_coordinator_config(path))
        return "coordinator"
    if "federation" in doc:
        load_plan(path)
        return "plan"
    raise ConfigError(str(path), "", "not a fedsilo file: expected a [site], [coordinator] or "
                                     "[federation] table")


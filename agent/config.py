"""Typed site config, coordinator config and federation plan, loaded from TOML.

Every check names the file, the key and the problem, so `fedsilo config check` (and every
daemon start) can exit 2 with one line a hospital IT person can act on.
Which kind a file is follows from its top-level table: `[site]`, `[coordinator]` or
`[federation]`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SITE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
FEDERATION_ID_PATTERN = SITE_ID_PATTERN
PROFILE_NAME_PATTERN = SITE_ID_PATTERN  # hardware profiles (agent/ops/hardware.py)
COLUMN_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

MODEL_KINDS = ("logistic", "mlp", "cnn_fused")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg",)
MISSING_POLICIES = ("mean", "drop")
FEATURE_TYPES = ("numeric", "categorical")
MQTT_PROTOCOLS = ("auto", "5", "3.1.1")


# ---------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class FeatureSpec:
    """One input column. Categorical levels are declared so every site one-hot encodes alike."""

    name: str
    type: str  # "numeric" | "categorical"
    levels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """`cnn_fused`: conv layers (`conv_channels`, `kernel_size`, ReLU, 2x2 max-pool) on the image,
    global average pooling, concatenated with the clinical features, then `hidden` dense layers
    and one logit."""

    kind: str = "logistic"
    hidden: tuple[int, ...] = ()
    conv_channels: tuple[int, ...] = ()
    kernel_size: int = 3


@dataclass(frozen=True)
class ImagingSpec:
    """How every site turns a series into the model's image: HU, window, resample to the grid.

    The grid is `depth` slices x `size` x `size` pixels spanning the series (slices become the
    image channels of the CNN)."""

    modality: str = "CT"
    depth: int = 8
    size: int = 32
    window_center: float = 40.0
    window_width: float = 80.0


@dataclass(frozen=True)
class TrainingSpec:
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What a federation trains: shared by the coordinator and (through the task) every site."""

    federation: str
    sites: tuple[str, ...]
    rounds: int
    min_sites: int
    round_deadline_s: float
    target: str
    features: tuple[FeatureSpec, ...]
    missing: str = "mean"
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    strategy: str = "fedavg"
    seed: int = 0
    imaging: ImagingSpec | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the wire (JSON) and for metrics files."""
        return {
            "federation": self.federation,
            "sites": list(self.sites),
            "rounds": self.rounds,
            "min_sites": self.min_sites,
            "round_deadline_s": self.round_deadline_s,
            "target": self.target,
            "features": [
                {"name": f.name, "type": f.type, "levels": list(f.levels)} for f in self.features
            ],
            "missing": self.missing,
            "model": {"kind": self.model.kind, "hidden": list(self.model.hidden),
                      "conv_channels": list(self.model.conv_channels),
                      "kernel_size": self.model.kernel_size},
            "imaging": None if self.imaging is None else {
                "modality": self.imaging.modality, "depth": self.imaging.depth,
                "size": self.imaging.size, "window_center": self.imaging.window_center,
                "window_width": self.imaging.window_width},
            "training": {
                "local_epochs": self.training.local_epochs,
                "batch_size": self.training.batch_size,
                "learning_rate": self.training.learning_rate,
                "optimizer": self.training.optimizer,
                "momentum": self.training.momentum,
                "weight_decay": self.training.weight_decay,
            },
            "strategy": self.strategy,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    protocol: str = "auto"
    tls: TLSFiles | None = None


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


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    broker: BrokerConfig
    coordinator_id: str = "coordinator"
    source: str = ""


# ---------------------------------------------------------------------------- checked reads


class _Reader:
    """Reads typed values out of one TOML table, naming file and dotted key on failure."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str) -> None:
        self.file = file
        self.table = table
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix, "must be a table")

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            required: bool = False) -> Any:
        if name not in self.table:
            if required or default is ...:
                raise self.fail(name, "is required but missing")
            return default
        value = self.table[name]
        # bool is an int subclass; never accept true/false where a number is asked for.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, got a boolean")
        if int in _as_tuple(kind) and float in _as_tuple(kind) and isinstance(value, int):
            return float(value) if kind == (float, int) else value
        if not isinstance(value, kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def number(self, name: str, default: Any = ..., *, lo: float | None = None,
               hi: float | None = None, integer: bool = False) -> Any:
        value = self.get(name, int if integer else (float, int), default)
        if value is None:
            return value
        if lo is not None and value < lo:
            raise self.fail(name, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(name, f"must be <= {hi}, got {value}")
        return float(value) if not integer else int(value)

    def choice(self, name: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(name, str, default)
        if value not in options:
            raise self.fail(name, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    def pattern(self, name: str, regex: re.Pattern[str], what: str, default: Any = ...) -> str:
        value = self.get(name, str, default)
        if not regex.fullmatch(value):
            raise self.fail(name, f"{value!r} is not a valid {what} (pattern {regex.pattern})")
        return value

    def sub(self, name: str, *, required: bool = False) -> _Reader | None:
        if name not in self.table:
            if required:
                raise self.fail(name, "table is required but missing")
            return None
        value = self.table[name]
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return _Reader(self.file, value, self.key(name))

    def reject_unknown(self, known: set[str]) -> None:
        for name in self.table:
            if name not in known:
                raise self.fail(name, f"unknown key (expected one of {', '.join(sorted(known))})")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _read_toml(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(file, "", "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not valid UTF-8 TOML") from None


def _path(base: Path, value: str) -> Path:
    """Relative paths in a config file are relative to that file, like systemd and Mosquitto."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


# ---------------------------------------------------------------------------- loaders


def _broker(file: str, r: _Reader | None, base: Path) -> BrokerConfig:
    if r is None:
        return BrokerConfig()
    r.reject_unknown({"host", "port", "keepalive_s", "protocol", "tls"})
    tls = None
    t = r.sub("tls")
    if t is not None:
        t.reject_unknown({"ca", "cert", "key"})
        files = {}
        for name in ("ca", "cert", "key"):
            p = _path(base, t.get(name, str, required=True))
            if not p.is_file():
                raise t.fail(name, f"file {p} does not exist")
            files[name] = p
        tls = TLSFiles(**files)
    return BrokerConfig(
        host=r.get("host", str, "127.0.0.1"),
        port=r.number("port", 1883, lo=1, hi=65535, integer=True),
        keepalive_s=r.number("keepalive_s", 30, lo=5, hi=60, integer=True),
        protocol=r.choice("protocol", MQTT_PROTOCOLS, "auto"),
        tls=tls,
    )


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
    top.reject_unknown({"site", "broker", "data", "dicom"})
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
        data=data,
        hardware_profile=_hardware_profile_name(s),
        dicom=_dicom(top.sub("dicom"), base),
        source=file,
    )


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
                      "series_quiet_s"})
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
    )


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    path = Path(path)
    file = str(path)
    top = _Reader(file, _read_toml(path), "")
    top.reject_unknown({"coordinator", "broker"})
    c = top.sub("coordinator", required=True)
    c.reject_unknown({"state_dir", "id"})
    return CoordinatorConfig(
        state_dir=_path(path.parent, c.get("state_dir", str, required=True)),
        broker=_broker(file, top.sub("broker"), path.parent),
        coordinator_id=c.pattern("id", SITE_ID_PATTERN, "coordinator id", "coordinator"),
        source=file,
    )


def _features(file: str, raw: Any) -> tuple[FeatureSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(file, "features", "must be a non-empty array of tables ([[features]])")
    out: list[FeatureSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        r = _Reader(file, item, f"features[{i}]")
        r.reject_unknown({"name", "type", "levels"})
        name = r.pattern("name", COLUMN_PATTERN, "column name", ...)
        if name in seen:
            raise r.fail("name", f"duplicate feature {name!r}")
        seen.add(name)
        ftype = r.choice("type", FEATURE_TYPES, ...)
        levels: tuple[str, ...] = ()
        if ftype == "categorical":
            raw_levels = r.get("levels", list, required=True)
            if len(raw_levels) < 2 or not all(isinstance(v, str) and v for v in raw_levels):
                raise r.fail("levels", "must list at least two non-empty strings")
            if len(set(raw_levels)) != len(raw_levels):
                raise r.fail("levels", "levels must be distinct")
            levels = tuple(raw_levels)
        elif "levels" in item:
            raise r.fail("levels", "only categorical features have levels")
        out.append(FeatureSpec(name=name, type=ftype, levels=levels))
    return tuple(out)


def plan_from_dict(doc: dict[str, Any], file: str = "<plan>") -> Plan:
    """Validate a plan given as data (from TOML on the coordinator, from JSON on a site)."""
    top = _Reader(file, doc, "")
    top.reject_unknown({"federation", "target", "features", "data", "model", "training",
                        "strategy", "imaging"})
    f = top.sub("federation", required=True)
    f.reject_unknown({"id", "sites", "rounds", "min_sites", "round_deadline_s", "seed"})
    sites_raw = f.get("sites", list, required=True)
    if not sites_raw:
        raise f.fail("sites", "must list at least one site id")
    for s in sites_raw:
        if not isinstance(s, str) or not SITE_ID_PATTERN.fullmatch(s):
            raise f.fail("sites", f"{s!r} is not a valid site id (pattern "
                                  f"{SITE_ID_PATTERN.pattern})")
    if len(set(sites_raw)) != len(sites_raw):
        raise f.fail("sites", "site ids must be distinct")
    min_sites = f.number("min_sites", len(sites_raw), lo=1, integer=True)
    if min_sites > len(sites_raw):
        raise f.fail("min_sites", f"is {min_sites} but only {len(sites_raw)} sites are listed")

    t = top.sub("target", required=True)
    t.reject_unknown({"column"})
    target = t.pattern("column", COLUMN_PATTERN, "column name", ...)
    features = _features(file, top.table.get("features"))
    if target in {ft.name for ft in features}:
        raise ConfigError(file, "target.column", f"{target!r} is also listed as a feature")

    missing = "mean"
    d = top.sub("data")
    if d is not None:
        d.reject_unknown({"missing"})
        missing = d.choice("missing", MISSING_POLICIES, "mean")

    model = ModelSpec()
    m = top.sub("model")
    if m is not None:
        m.reject_unknown({"kind", "hidden", "conv_channels", "kernel_size"})
        kind = m.choice("kind", MODEL_KINDS, "logistic")
        hidden_raw = m.get("hidden", list, [])
        if not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 4096
                   for h in hidden_raw):
            raise m.fail("hidden", "must be a list of layer widths between 1 and 4096")
        if kind == "mlp" and not hidden_raw:
            raise m.fail("hidden", "an mlp needs at least one hidden layer width")
        if kind == "logistic" and hidden_raw:
            raise m.fail("hidden", "a logistic model has no hidden layers")
        channels = m.get("conv_channels", list, [])
        if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 256
                   for c in channels):
            raise m.fail("conv_channels", "must be a list of channel counts between 1 and 256")
        if (kind == "cnn_fused") != bool(channels):
            raise m.fail("conv_channels", "a cnn_fused model needs conv_channels; other kinds "
                                          "have none")
        kernel_size = m.number("kernel_size", 3, lo=1, hi=7, integer=True)
        if kernel_size % 2 == 0:
            raise m.fail("kernel_size", "must be odd (same padding)")
        model = ModelSpec(kind=kind, hidden=tuple(hidden_raw), conv_channels=tuple(channels),
                          kernel_size=kernel_size)

    imaging = None
    im = top.sub("imaging")
    if im is not None:
        im.reject_unknown({"modality", "depth", "size", "window_center", "window_width"})
        imaging = ImagingSpec(
            modality=im.choice("modality", ("CT", "MR"), "CT"),
            depth=im.number("depth", 8, lo=1, hi=256, integer=True),
            size=im.number("size", 32, lo=4, hi=1024, integer=True),
            window_center=im.number("window_center", 40.0, lo=-4096.0, hi=4096.0),
            window_width=im.number("window_width", 80.0, lo=1.0, hi=8192.0),
        )
    if model.kind == "cnn_fused" and imaging is None:
        raise ConfigError(file, "imaging", "a cnn_fused model needs an [imaging] table")
    if model.kind == "cnn_fused" and imaging.size % (2 ** len(model.conv_channels)) != 0:
        raise ConfigError(file, "imaging.size", f"must be divisible by "
                          f"{2 ** len(model.conv_channels)} (one 2x2 pooling per conv layer)")

    training = TrainingSpec()
    tr = top.sub("training")
    if tr is not None:
        tr.reject_unknown({"local_epochs", "batch_size", "learning_rate", "optimizer",
                           "momentum", "weight_decay"})
        training = TrainingSpec(
            local_epochs=tr.number("local_epochs", 1, lo=1, hi=1000, integer=True),
            batch_size=tr.number("batch_size", 32, lo=1, hi=1 << 20, integer=True),
            learning_rate=tr.number("learning_rate", 0.05, lo=1e-9, hi=100.0),
            optimizer=tr.choice("optimizer", OPTIMIZERS, "sgd"),
            momentum=tr.number("momentum", 0.9, lo=0.0, hi=0.999),
            weight_decay=tr.number("weight_decay", 0.0, lo=0.0, hi=1.0),
        )

    strategy = "fedavg"
    st = top.sub("strategy")
    if st is not None:
        st.reject_unknown({"name"})
        strategy = st.choice("name", STRATEGIES, "fedavg")

    return Plan(
        federation=f.pattern("id", FEDERATION_ID_PATTERN, "federation id", ...),
        sites=tuple(sites_raw),
        rounds=f.number("rounds", ..., lo=1, hi=100_000, integer=True),
        min_sites=min_sites,
        round_deadline_s=f.number("round_deadline_s", 60.0, lo=0.1, hi=7 * 86400),
        target=target,
        features=features,
        missing=missing,
        model=model,
        training=training,
        strategy=strategy,
        seed=f.number("seed", 0, lo=0, integer=True),
        imaging=imaging,
        source=file,
    )


def plan_to_toml_dict(plan: Plan) -> dict[str, Any]:
    """The TOML-shaped document of a plan (inverse of `plan_from_dict`)."""
    d = plan.to_dict()
    model = {"kind": d["model"]["kind"], "hidden": d["model"]["hidden"]}
    if plan.model.conv_channels:
        model |= {"conv_channels": d["model"]["conv_channels"],
                  "kernel_size": d["model"]["kernel_size"]}
    doc = {
        "federation": {"id": d["federation"], "sites": d["sites"], "rounds": d["rounds"],
                       "min_sites": d["min_sites"], "round_deadline_s": d["round_deadline_s"],
                       "seed": d["seed"]},
        "target": {"column": d["target"]},
        "features": [{k: v for k, v in f.items() if k != "levels" or v} for f in d["features"]],
        "data": {"missing": d["missing"]},
        "model": model,
        "training": d["training"],
        "strategy": {"name": d["strategy"]},
    }
    if d["imaging"] is not None:
        doc["imaging"] = d["imaging"]
    return doc


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    return plan_from_dict(_read_toml(path), str(path))


def check_file(path: str | Path) -> str:
    """Validate any fedsilo TOML file; returns its kind ('site', 'coordinator' or 'plan')."""
    path = Path(path)
    doc = _read_toml(path)
    if "site" in doc:
        site = load_site_config(path)
        # Lazy: hardware imports this module. Loading also surfaces a broken profile file.
        from agent.ops.hardware import default_profiles_dir, load_profiles, profile_named

        profiles = load_profiles(default_profiles_dir())
        if site.hardware_profile != "auto":
            profile_named(profiles, site.hardware_profile, source=str(path))
        return "site"
    if "coordinator" in doc:
        load_coordinator_config(path)
        return "coordinator"
    if "federation" in doc:
        load_plan(path)
        return "plan"
    raise ConfigError(str(path), "", "not a fedsilo file: expected a [site], [coordinator] or "
                                     "[federation] table")

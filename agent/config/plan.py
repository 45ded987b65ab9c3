"""The federation plan: what a consortium trains, shared by the coordinator and (inside every
task) each site, validated on load into immutable objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.checks import (
    COLUMN_PATTERN,
    FEDERATION_ID_PATTERN,
    SITE_ID_PATTERN,
    _read_toml,
    _Reader,
)
from agent.errors import ConfigError
from agent.learn.kinds import kind_names, model_kind

OPTIMIZERS = ("sgd", "adam")
# Each strategy and the [strategy] options it takes (besides `name` and `max_weight_fraction`);
# the implementations are registered in agent/federation/strategy.py under the same names.
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("mu",),
    "fedadam": ("server_lr", "beta1", "beta2", "tau"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau"),
    "median": ("bucket_size",),
    "trimmed_mean": ("trim_fraction",),
    "multi_krum": ("byzantine", "krum_select"),
    "norm_bound": ("norm_bound", "norm_action"),
}
STRATEGIES = tuple(STRATEGY_OPTIONS)
NORM_ACTIONS = ("clip", "reject")
QUANTIZERS = ("none", "int8")
DP_MODES = ("none", "client", "sample")
# Strategies whose round is a weighted mean: the only ones secure aggregation can compute
# (the coordinator sees the sum only, never an update to compare).
SECURE_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
MISSING_POLICIES = ("mean", "drop")
FEATURE_TYPES = ("numeric", "categorical")
MAX_UNIT = 32


@dataclass(frozen=True)
class StrategySpec:
    """How the coordinator combines updates (README's plan table says what each does).

    `max_weight_fraction` caps the share of the total weight any one site may have, whatever
    sample count it claims. fedprox: FedAvg with the proximal term `mu` in each site's local
    steps (Li et al., MLSys 2020). Server optimizers (fedadam, fedyogi: Reddi et al., ICLR
    2021) step with `server_lr`, `beta1`, `beta2`, `tau` on the mean update. Robust rules:
    the coordinate-wise median of the means of random buckets of `bucket_size` updates
    (median; 1 = the plain median; Karimireddy, He & Jaggi, ICLR 2022: buckets make the
    median of different hospitals' updates close to their mean); `trim_fraction` of the
    values dropped at each end per coordinate (trimmed_mean); `byzantine`
    sites assumed bad and `krum_select` updates averaged (multi_krum, 0 = all but `byzantine`);
    updates whose norm exceeds `norm_bound` x the round's median norm are clipped to it or
    rejected (norm_bound)."""

    name: str = "fedavg"
    max_weight_fraction: float = 1.0
    mu: float = 0.01
    server_lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bucket_size: int = 2
    trim_fraction: float = 0.1
    byzantine: int = 1
    krum_select: int = 0
    norm_bound: float = 3.0
    norm_action: str = "reject"

    def options(self) -> dict[str, Any]:
        """The settings this strategy uses (plan digest, wire, metrics): only those."""
        keys = ("max_weight_fraction", *STRATEGY_OPTIONS[self.name])
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class FeatureSpec:
    """One input column. Categorical levels are declared so every site one-hot encodes alike."""

    name: str
    type: str  # "numeric" | "categorical"
    levels: tuple[str, ...] = ()
    unit: str = ""  # e.g. "years", "mmol/L": shown on the exported model's card, not used


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
class CompressionSpec:
    """How sites encode their updates (local minus global parameters) for the wire.

    `quantize` "int8": one int8 code per value and a float32 scale per `block` values, with
    stochastic rounding (unbiased); "none": float32. `topk_fraction` < 1 sends only that share
    of the values with the largest magnitude, keeping what was not sent as a residual in the
    site's state directory (error feedback). zstd at `zstd_level` compresses the packed bytes."""

    quantize: str = "none"
    topk_fraction: float = 1.0
    block: int = 256
    zstd_level: int = 3


@dataclass(frozen=True)
class PrivacySpec:
    """What a site may reveal, and how (docs/privacy.md).

    `min_cell`: a site with fewer training rows sends no statistics, metrics or update.
    `secure_aggregation`: pairwise masks so the coordinator learns only the sum; each value is
    clipped to +-`value_bound` and fixed-point quantized first (clipped values are counted).
    `dp`: "client" clips each site's update to L2 norm `dp_clip` and adds Gaussian noise
    `dp_noise_multiplier` x `dp_clip` to the sum; "sample" is DP-SGD at each site (each
    example's gradient clipped to `dp_clip`, noise on every step's sum). The coordinator stops
    before a round would spend more than (`dp_epsilon`, `dp_delta`)."""

    min_cell: int = 10
    secure_aggregation: bool = False
    value_bound: float = 0.5
    dp: str = "none"
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_epsilon: float = 10.0
    dp_delta: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        return {"min_cell": self.min_cell, "secure_aggregation": self.secure_aggregation,
                "value_bound": self.value_bound, "dp": self.dp, "dp_clip": self.dp_clip,
                "dp_noise_multiplier": self.dp_noise_multiplier,
                "dp_epsilon": self.dp_epsilon, "dp_delta": self.dp_delta}


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
    strategy: StrategySpec = field(default_factory=StrategySpec)
    seed: int = 0
    imaging: ImagingSpec | None = None
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
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
            # A unit only when declared, so plans from before units keep their digest.
            "features": [
                {"name": f.name, "type": f.type, "levels": list(f.levels),
                 **({"unit": f.unit} if f.unit else {})} for f in self.features
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
            # The name alone for plain FedAvg, so plans (and their checkpoints' digests) from
            # before strategies had options stay the same plan.
            "strategy": self.strategy.name if self.strategy == StrategySpec() else {
                "name": self.strategy.name, **self.strategy.options()},
            "seed": self.seed,
            "compression": {"quantize": self.compression.quantize,
                            "topk_fraction": self.compression.topk_fraction,
                            "block": self.compression.block,
                            "zstd_level": self.compression.zstd_level},
            # Only when set, so plans from before [privacy] keep their digest.
            **({} if self.privacy == PrivacySpec() else {"privacy": self.privacy.to_dict()}),
        }



def _features(file: str, raw: Any) -> tuple[FeatureSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(file, "features", "must be a non-empty array of tables ([[features]])")
    out: list[FeatureSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        r = _Reader(file, item, f"features[{i}]")
        r.reject_unknown({"name", "type", "levels", "unit"})
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
        unit = r.get("unit", str, "")
        if len(unit) > MAX_UNIT or not unit.isprintable():
            raise r.fail("unit", f"must be printable text of at most {MAX_UNIT} characters")
        out.append(FeatureSpec(name=name, type=ftype, levels=levels, unit=unit))
    return tuple(out)


def plan_from_dict(doc: dict[str, Any], file: str = "<plan>") -> Plan:
    """Validate a plan given as data (from TOML on the coordinator, from JSON on a site)."""
    top = _Reader(file, doc, "")
    top.reject_unknown({"federation", "target", "features", "data", "model", "training",
                        "strategy", "imaging", "compression", "privacy"})
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
        kind = m.choice("kind", kind_names(), "logistic")
        hidden_raw = m.get("hidden", list, [])
        if not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 4096
                   for h in hidden_raw):
            raise m.fail("hidden", "must be a list of layer widths between 1 and 4096")
        channels = m.get("conv_channels", list, [])
        if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 256
                   for c in channels):
            raise m.fail("conv_channels", "must be a list of channel counts between 1 and 256")
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
    problem = model_kind(model.kind).plan_problem(model, imaging)
    if problem is not None:
        raise ConfigError(file, *problem)

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

    strategy = StrategySpec()
    st = top.sub("strategy")
    if st is not None:
        name = st.choice("name", STRATEGIES, "fedavg")
        st.reject_unknown({"name", "max_weight_fraction", *STRATEGY_OPTIONS[name]})
        d = StrategySpec()
        strategy = StrategySpec(
            name=name,
            max_weight_fraction=st.number("max_weight_fraction", d.max_weight_fraction,
                                          lo=1e-3, hi=1.0),
            mu=st.number("mu", d.mu, lo=0.0, hi=100.0),
            server_lr=st.number("server_lr", d.server_lr, lo=1e-6, hi=10.0),
            beta1=st.number("beta1", d.beta1, lo=0.0, hi=0.9999),
            beta2=st.number("beta2", d.beta2, lo=0.0, hi=0.99999),
            tau=st.number("tau", d.tau, lo=1e-9, hi=1.0),
            bucket_size=st.number("bucket_size", d.bucket_size, lo=1, hi=1000, integer=True),
            trim_fraction=st.number("trim_fraction", d.trim_fraction, lo=0.0, hi=0.49),
            byzantine=st.number("byzantine", d.byzantine, lo=0, hi=1000, integer=True),
            krum_select=st.number("krum_select", d.krum_select, lo=0, hi=10_000, integer=True),
            norm_bound=st.number("norm_bound", d.norm_bound, lo=1.0, hi=1e6),
            norm_action=st.choice("norm_action", NORM_ACTIONS, d.norm_action))

    compression = CompressionSpec()
    c = top.sub("compression")
    if c is not None:
        c.reject_unknown({"quantize", "topk_fraction", "block", "zstd_level"})
        compression = CompressionSpec(
            quantize=c.choice("quantize", QUANTIZERS, "none"),
            topk_fraction=c.number("topk_fraction", 1.0, lo=1e-6, hi=1.0),
            block=c.number("block", 256, lo=16, hi=1 << 16, integer=True),
            zstd_level=c.number("zstd_level", 3, lo=1, hi=19, integer=True),
        )

    privacy = _privacy(top.sub("privacy"), strategy, compression)

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
        compression=compression,
        privacy=privacy,
        source=file,
    )


def _privacy(r: _Reader | None, strategy: StrategySpec, compression: CompressionSpec
             ) -> PrivacySpec:
    if r is None:
        return PrivacySpec()
    r.reject_unknown(set(PrivacySpec().to_dict()))
    d = PrivacySpec()
    spec = PrivacySpec(
        min_cell=r.number("min_cell", d.min_cell, lo=1, hi=1_000_000, integer=True),
        secure_aggregation=r.get("secure_aggregation", bool, d.secure_aggregation),
        value_bound=r.number("value_bound", d.value_bound, lo=1e-6, hi=1e6),
        dp=r.choice("dp", DP_MODES, d.dp),
        dp_clip=r.number("dp_clip", d.dp_clip, lo=1e-9, hi=1e9),
        dp_noise_multiplier=r.number("dp_noise_multiplier", d.dp_noise_multiplier, lo=0.01,
                                     hi=1e4),
        dp_epsilon=r.number("dp_epsilon", d.dp_epsilon, lo=1e-3, hi=1e4),
        dp_delta=r.number("dp_delta", d.dp_delta, lo=1e-15, hi=0.1))
    if spec.secure_aggregation:
        if strategy.name not in SECURE_STRATEGIES:
            raise r.fail("secure_aggregation", f"the coordinator sees only the sum, so "
                         f"{strategy.name} (which compares updates) cannot run; use one of "
                         f"{', '.join(SECURE_STRATEGIES)}")
        if compression.topk_fraction < 1.0:
            raise r.fail("secure_aggregation", "masks cover every value, so top-k "
                         "(compression.topk_fraction < 1) cannot be sent masked; set it to 1")
    if spec.dp == "client" and strategy.name not in SECURE_STRATEGIES:
        raise r.fail("dp", f"the noise is calibrated to a mean of clipped updates; "
                     f"{strategy.name} is not one: use one of {', '.join(SECURE_STRATEGIES)}")
    if spec.dp == "client" and compression.topk_fraction < 1.0:
        raise r.fail("dp", "top-k keeps an un-noised residual at the site, which would carry "
                     "data past the mechanism; set compression.topk_fraction to 1")
    return spec


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
        "strategy": d["strategy"] if isinstance(d["strategy"], dict)
        else {"name": d["strategy"]},
    }
    if d["imaging"] is not None:
        doc["imaging"] = d["imaging"]
    doc["compression"] = d["compression"]
    if "privacy" in d:
        doc["privacy"] = d["privacy"]
    return doc


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    return plan_from_dict(_read_toml(path), str(path))


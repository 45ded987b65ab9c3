"""Synthetic acute ischemic stroke cohorts for the demo and the tests.

No hospital may share patient rows, so the demo and the tests generate them. The generator is a
small causal model anchored on published facts (equations and sources in docs/cohort.md):

  case mix (age, sex, AF, pre-stroke mRS)  ->  latent large-vessel occlusion (LVO)  ->  NIHSS
  NIHSS, LVO  ->  latent visual field defect, latent decreased consciousness
  arrival (onset-to-door), glucose, blood pressure
  eligibility + site practice  ->  IV thrombolysis, thrombectomy
  ASTRAL score + treatment effects + pre-stroke disability + unobserved frailty
      ->  P(good outcome = 90-day mRS <= 2)

Sites differ in case mix, severity (referral pattern), arrival times, treatment capability and
coding habits (missing-value tokens, broken rows, optionally glucose in mg/dL), so what each site
can learn alone differs, which is what federation is for. Everything is driven by the
`np.random.Generator` passed in, so a seed reproduces a cohort exactly.

All data are synthetic; patient ids say so ("SYN-<site>-000123").
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from agent.config import FeatureSpec

DEMO_TARGET = "good_outcome"
TABLE_COLUMNS = (
    "patient_id", "age", "sex", "nihss", "onset_to_door_min", "glucose_mmol_l", "systolic_bp",
    "atrial_fibrillation", "prestroke_mrs", "thrombolysis", "thrombectomy", DEMO_TARGET,
)
SITE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")

# ASTRAL (Ntaios et al., Neurology 2012): P(unfavourable) = expit(A * score + B).
ASTRAL_SLOPE = 0.1838
ASTRAL_INTERCEPT = -5.587
# HERMES (Goyal et al., Lancet 2016): common OR ~2.5 for a better 90-day mRS after thrombectomy.
THROMBECTOMY_LOG_OR = math.log(2.5)
# Emberson et al. (Lancet 2014): IV thrombolysis benefit falls with onset-to-treatment time and is
# gone by ~4.5 h. Here: OR 2.0 at <= 60 min, falling linearly on the log scale to 1.0 at 270 min.
THROMBOLYSIS_MAX_LOG_OR = math.log(2.0)
THROMBOLYSIS_FULL_MIN = 60.0
THROMBOLYSIS_WINDOW_MIN = 270.0
# Our own choices (not from the sources): see docs/cohort.md.
OUTCOME_OFFSET = -1.2  # shift of the log-odds of a good outcome, calibrates outcome rates
FRAILTY_SD = 1.0  # unobserved patient-level log-odds noise (comorbidity, complications, ...)
PRESTROKE_LOG_OR = -0.5  # per pre-stroke mRS point 0..2
PRESTROKE_DEPENDENT_LOG_OR = -2.5  # pre-stroke mRS >= 3: already dependent before the stroke
AF_LOG_OR = -0.2
# Infarct core visible on non-contrast CT (only with `imaging=True`): each 10 ml lowers the odds
# of a good outcome by ~22%, in the range reported for core volume in thrombectomy cohorts.
CORE_LOG_OR_PER_ML = -0.04
CORE_CAP_ML = 200.0
MG_PER_DL_PER_MMOL_L = 18.016  # glucose

# Share of missing cells per column relative to the site's missing_rate (unknown onset time and
# labs are missed far more often than age or treatment flags).
MISSING_WEIGHT = {
    "age": 0.2, "sex": 0.1, "nihss": 1.0, "onset_to_door_min": 2.0, "glucose_mmol_l": 1.5,
    "systolic_bp": 1.0, "atrial_fibrillation": 1.0, "prestroke_mrs": 1.5, "thrombolysis": 0.2,
    "thrombectomy": 0.2,
}
BROKEN_KINDS = ("wrong_field_count", "unparseable", "unknown_level", "target_missing")


@dataclass(frozen=True)
class SiteProfile:
    """One simulated hospital: size, case mix, practice and coding habits."""

    name: str
    n_patients: int
    age_mean: float = 72.0
    age_sd: float = 13.0
    lvo_fraction: float = 0.3  # share of large-vessel occlusions (referral pattern)
    severity: float = 1.0  # multiplies the mean NIHSS of both LVO and non-LVO strokes
    onset_to_door_median_min: float = 120.0
    onset_to_door_spread: float = 0.7  # sigma of log(onset-to-door)
    door_to_needle_min: float = 45.0
    thrombolysis_rate: float = 0.8  # share of eligible patients who get IV thrombolysis
    thrombectomy_rate: float = 0.0  # share of eligible LVO patients treated; 0 = no service
    missing_rate: float = 0.03  # base share of missing cells (see MISSING_WEIGHT)
    missing_token: str = ""  # how this site's export writes a missing value
    broken_row_rate: float = 0.01  # share of rows damaged on export (at least 4 if > 0)
    glucose_unit: str = "mmol/l"  # "mg/dl": export writes mg/dL under the mmol/L column name
    unrecorded: tuple[str, ...] = ()  # feature columns this site's registry never fills in

    def __post_init__(self) -> None:
        if not SITE_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"site name {self.name!r} must match {SITE_NAME_PATTERN.pattern}")
        if self.n_patients < 1:
            raise ValueError("n_patients must be at least 1")
        for key in ("lvo_fraction", "thrombolysis_rate", "thrombectomy_rate", "missing_rate",
                    "broken_row_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be within [0, 1]")
        unknown = set(self.unrecorded) - set(MISSING_WEIGHT)
        if unknown:
            raise ValueError(f"unrecorded: not feature columns: {sorted(unknown)}")
        if self.glucose_unit not in ("mmol/l", "mg/dl"):
            raise ValueError("glucose_unit must be 'mmol/l' or 'mg/dl'")
        if min(self.age_sd, self.severity, self.onset_to_door_median_min,
               self.onset_to_door_spread, self.door_to_needle_min) <= 0:
            raise ValueError("age_sd, severity, onset-to-door and door-to-needle must be > 0")


_HAND_WRITTEN = (
    # Large urban comprehensive stroke centre: short arrivals (almost none beyond 3 h), many LVO
    # referrals, thrombectomy around the clock, tidy exports.
    SiteProfile(name="city-csc", n_patients=1200, age_mean=69.0, age_sd=14.0, lvo_fraction=0.40,
                severity=1.1, onset_to_door_median_min=75.0, onset_to_door_spread=0.30,
                door_to_needle_min=30.0, thrombolysis_rate=0.85, thrombectomy_rate=0.85,
                missing_rate=0.02, missing_token="", broken_row_rate=0.005),
    # Mid-size general hospital: mixed arrivals, thrombectomy only in office hours, and a
    # registry that never recorded pre-stroke mRS.
    SiteProfile(name="valley-general", n_patients=400, age_mean=73.0, age_sd=12.0,
                lvo_fraction=0.25, severity=1.0, onset_to_door_median_min=150.0,
                onset_to_door_spread=0.70, door_to_needle_min=50.0, thrombolysis_rate=0.70,
                thrombectomy_rate=0.30, missing_rate=0.05, missing_token="NA",
                broken_row_rate=0.01, unrecorded=("prestroke_mrs",)),
    # Small rural hospital: older patients, late arrivals, no thrombectomy service.
    SiteProfile(name="north-rural", n_patients=150, age_mean=77.0, age_sd=11.0,
                lvo_fraction=0.20, severity=0.9, onset_to_door_median_min=260.0,
                onset_to_door_spread=0.60, door_to_needle_min=70.0, thrombolysis_rate=0.60,
                thrombectomy_rate=0.0, missing_rate=0.06, missing_token=".",
                broken_row_rate=0.02),
)
_BASE_KIND = ("csc", "general", "rural")


def default_profiles(n_sites: int, seed: int) -> list[SiteProfile]:
    """The three hand-written sites, then seeded perturbations of them (deterministic)."""
    if n_sites < 1:
        raise ValueError("n_sites must be at least 1")
    out = list(_HAND_WRITTEN[:n_sites])
    rng = np.random.default_rng([seed, 0x5173])
    for i in range(len(out), n_sites):
        base = _HAND_WRITTEN[i % 3]
        z = rng.normal(0.0, 1.0, size=6)  # one standard-normal draw per perturbed knob
        out.append(replace(
            base,
            name=f"{_BASE_KIND[i % 3]}-{i + 1:02d}",
            n_patients=int(np.clip(round(base.n_patients * math.exp(0.4 * z[0])), 60, 5000)),
            age_mean=float(np.clip(base.age_mean + 2.5 * z[1], 60.0, 82.0)),
            lvo_fraction=float(np.clip(base.lvo_fraction * math.exp(0.2 * z[2]), 0.1, 0.6)),
            onset_to_door_median_min=float(np.clip(
                base.onset_to_door_median_min * math.exp(0.25 * z[3]), 45.0, 420.0)),
            thrombolysis_rate=float(np.clip(base.thrombolysis_rate + 0.08 * z[4], 0.3, 0.95)),
            thrombectomy_rate=(0.0 if base.thrombectomy_rate == 0.0 else float(
                np.clip(base.thrombectomy_rate + 0.08 * z[5], 0.1, 0.95))),
        ))
    return out


# ---------------------------------------------------------------------------- the model


def _expit(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _neg_binomial(rng: np.random.Generator, mean: float, dispersion: float,
                  n: int) -> np.ndarray:
    """Over-dispersed counts (NIHSS is skewed: many mild strokes, a long severe tail)."""
    return rng.negative_binomial(dispersion, dispersion / (dispersion + mean), size=n)


def thrombolysis_log_or(onset_to_treatment_min: np.ndarray) -> np.ndarray:
    """Log odds ratio of a good outcome for IV thrombolysis given at this time after onset."""
    frac = (THROMBOLYSIS_WINDOW_MIN - onset_to_treatment_min) / (
        THROMBOLYSIS_WINDOW_MIN - THROMBOLYSIS_FULL_MIN)
    return THROMBOLYSIS_MAX_LOG_OR * np.clip(frac, 0.0, 1.0)


def astral_score(age: np.ndarray, nihss: np.ndarray, onset_to_door_min: np.ndarray,
                 visual_field_defect: np.ndarray, glucose_mmol_l: np.ndarray,
                 decreased_consciousness: np.ndarray) -> np.ndarray:
    """Integer ASTRAL score (Ntaios 2012) from its six items."""
    return (np.floor(age / 5.0) + nihss + 2 * (onset_to_door_min > 180)
            + 2 * visual_field_defect
            + ((glucose_mmol_l < 3.7) | (glucose_mmol_l > 7.3)) + 3 * decreased_consciousness)


def _patients(p: SiteProfile, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Case mix and the stroke itself (including the latent LVO, visual field, consciousness)."""
    age = np.clip(np.round(rng.normal(p.age_mean, p.age_sd, n)), 18, 99)
    female = rng.random(n) < np.clip(0.45 + 0.006 * (age - 72.0), 0.2, 0.8)
    af = rng.random(n) < _expit(-1.6 + 0.055 * (age - 75.0))
    prestroke = np.digitize(0.05 * (age - 75.0) + rng.normal(0.0, 1.0, n),
                            [0.3, 1.0, 1.5, 2.0, 2.5])
    lvo = rng.random(n) < _expit(_logit(p.lvo_fraction) + 0.6 * (af - 0.2))
    nihss = np.where(lvo, _neg_binomial(rng, 15.0 * p.severity, 5.0, n),
                     _neg_binomial(rng, 3.5 * p.severity, 1.2, n))
    nihss = np.clip(nihss, 0, 42)
    vfd = rng.random(n) < _expit(-2.6 + 0.07 * nihss + 0.7 * lvo)
    dloc = rng.random(n) < _expit(-5.2 + 0.2 * nihss)
    onset_to_door = np.clip(np.round(rng.lognormal(math.log(p.onset_to_door_median_min),
                                                   p.onset_to_door_spread, n)), 10, 1440)
    diabetic = rng.random(n) < 0.25
    glucose = np.where(diabetic, rng.lognormal(math.log(9.0), 0.30, n),
                       rng.lognormal(math.log(6.2), 0.18, n))
    glucose = np.round(np.clip(glucose, 2.2, 30.0), 1)
    sbp = np.round(np.clip(rng.normal(152.0 + 0.3 * (age - 72.0), 24.0, n), 80, 250))
    return {"age": age, "female": female, "af": af, "prestroke": prestroke, "lvo": lvo,
            "nihss": nihss, "vfd": vfd, "dloc": dloc, "onset_to_door": onset_to_door,
            "glucose": glucose, "sbp": sbp}


def _treatments(p: SiteProfile, rng: np.random.Generator, v: dict[str, np.ndarray]) -> None:
    """Guideline-like eligibility, then the site's practice; adds ivt, evt, onset_to_treatment."""
    n = len(v["age"])
    door_to_needle = p.door_to_needle_min * rng.lognormal(0.0, 0.3, n)
    v["onset_to_treatment"] = v["onset_to_door"] + door_to_needle
    anticoagulated = v["af"] & (rng.random(n) < 0.35)
    bp_uncontrolled = (v["sbp"] > 185) & (rng.random(n) < 0.5)
    ivt_eligible = ((v["onset_to_treatment"] <= THROMBOLYSIS_WINDOW_MIN)
                    & ((v["nihss"] >= 4) | (rng.random(n) < 0.3)) & (v["glucose"] >= 2.8)
                    & (v["prestroke"] <= 2) & ~anticoagulated & ~bp_uncontrolled)
    v["ivt"] = ivt_eligible & (rng.random(n) < p.thrombolysis_rate)
    late_window = rng.random(n) < 0.35  # 6-24 h: only imaging-selected patients qualify
    evt_eligible = (v["lvo"] & (v["nihss"] >= 6) & (v["prestroke"] <= 2)
                    & ((v["onset_to_door"] <= 360) | late_window))
    v["evt"] = evt_eligible & (rng.random(n) < p.thrombectomy_rate)


def _infarct_core(rng: np.random.Generator, v: dict[str, np.ndarray]) -> None:
    """Latent infarct core volume (ml): large with a large-vessel occlusion, growing with time
    and with the deficits that betray it (visual field, consciousness); adds `core_ml`."""
    n = len(v["age"])
    log_median = (np.where(v["lvo"], math.log(35.0), math.log(4.0))
                  + 0.3 * np.log(v["onset_to_door"] / 120.0) + 0.03 * (v["nihss"] - 8)
                  + 0.4 * v["vfd"] + 0.4 * v["dloc"])
    v["core_ml"] = np.clip(np.exp(log_median + rng.normal(0.0, 1.0, n)), 0.2, CORE_CAP_ML)


def _outcome(rng: np.random.Generator, v: dict[str, np.ndarray]) -> None:
    """ASTRAL log-odds plus treatment effects, prior disability and frailty (and the infarct
    core when imaging is simulated); adds p_good, good."""
    n = len(v["age"])
    core_term = CORE_LOG_OR_PER_ML * (v["core_ml"] - 10.0) if "core_ml" in v else 0.0
    score = astral_score(v["age"], v["nihss"], v["onset_to_door"], v["vfd"], v["glucose"],
                         v["dloc"])
    log_odds_good = (OUTCOME_OFFSET - (ASTRAL_SLOPE * score + ASTRAL_INTERCEPT)
                     + THROMBECTOMY_LOG_OR * v["evt"]
                     + thrombolysis_log_or(v["onset_to_treatment"]) * v["ivt"]
                     + PRESTROKE_LOG_OR * np.minimum(v["prestroke"], 2)
                     + PRESTROKE_DEPENDENT_LOG_OR * (v["prestroke"] >= 3)
                     + AF_LOG_OR * v["af"]
                     - 0.012 * np.maximum(v["sbp"] - 170.0, 0.0)
                     - 0.02 * np.maximum(110.0 - v["sbp"], 0.0)
                     + core_term
                     + rng.normal(0.0, FRAILTY_SD, n))
    v["p_good"] = _expit(log_odds_good)
    v["good"] = rng.random(n) < v["p_good"]


def generate_cohort(profile: SiteProfile, rng: np.random.Generator, n: int | None = None, *,
                    include_latent: bool = False, imaging: bool = False
                    ) -> dict[str, np.ndarray]:
    """One site's patients as columns (TABLE_COLUMNS); `include_latent` adds `_`-prefixed truths.

    Latent columns (`_lvo`, `_visual_field_defect`, `_decreased_consciousness`, `_p_good`) are
    for tests and documentation only; a real site never sees them.
    """
    n = profile.n_patients if n is None else int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    v = _patients(profile, rng, n)
    _treatments(profile, rng, v)
    if imaging:  # only then: keeps every table-only cohort exactly as it was
        _infarct_core(rng, v)
    _outcome(rng, v)
    width = max(6, len(str(n * 10)))
    numbers = rng.choice(10 ** width, size=n, replace=False) if n else np.zeros(0, np.int64)
    yes_no = np.array(["no", "yes"])
    out: dict[str, np.ndarray] = {
        "patient_id": np.array([f"SYN-{profile.name}-{k:0{width}d}" for k in numbers],
                               dtype=str),
        "age": v["age"].astype(np.int64),
        "sex": np.where(v["female"], "female", "male"),
        "nihss": v["nihss"].astype(np.int64),
        "onset_to_door_min": v["onset_to_door"].astype(np.int64),
        "glucose_mmol_l": v["glucose"].astype(np.float64),
        "systolic_bp": v["sbp"].astype(np.int64),
        "atrial_fibrillation": yes_no[v["af"].astype(np.int64)],
        "prestroke_mrs": v["prestroke"].astype(np.int64),
        "thrombolysis": yes_no[v["ivt"].astype(np.int64)],
        "thrombectomy": yes_no[v["evt"].astype(np.int64)],
        DEMO_TARGET: v["good"].astype(np.int64),
    }
    if include_latent:
        out["_lvo"] = v["lvo"]
        out["_visual_field_defect"] = v["vfd"]
        out["_decreased_consciousness"] = v["dloc"]
        out["_p_good"] = v["p_good"]
    if imaging:  # the CT generator draws the lesion from it; never a table column
        out["_core_ml"] = v["core_ml"]
    return out


def common_test_set(profiles: list[SiteProfile], rng: np.random.Generator, n: int = 2000, *,
                    include_latent: bool = False, imaging: bool = False
                    ) -> dict[str, np.ndarray]:
    """A clean, shuffled test set with an equal share of every site's population.

    Equal shares (not shares by size) because the federation's model must serve every member
    hospital, not only the biggest one; site-alone models are judged on all of them.
    """
    if not profiles:
        raise ValueError("at least one profile is needed")
    shares = np.full(len(profiles), n // len(profiles))
    shares[: n % len(profiles)] += 1
    parts = [generate_cohort(replace(p, name=f"t-{p.name}"[:32]), rng, int(k),
                             include_latent=include_latent, imaging=imaging)
             for p, k in zip(profiles, shares, strict=True)]
    order = rng.permutation(n)
    return {key: np.concatenate([part[key] for part in parts])[order] for key in parts[0]}


def demo_features() -> tuple[FeatureSpec, ...]:
    """The demo plan's features, in the order the model sees them."""
    yes_no = ("no", "yes")
    return (
        FeatureSpec("age", "numeric", unit="years"),
        FeatureSpec("sex", "categorical", ("female", "male")),
        FeatureSpec("nihss", "numeric", unit="NIHSS points 0-42"),
        FeatureSpec("onset_to_door_min", "numeric", unit="min"),
        FeatureSpec("glucose_mmol_l", "numeric", unit="mmol/L"),
        FeatureSpec("systolic_bp", "numeric", unit="mmHg"),
        FeatureSpec("atrial_fibrillation", "categorical", yes_no),
        FeatureSpec("prestroke_mrs", "numeric", unit="mRS 0-5"),
        FeatureSpec("thrombolysis", "categorical", yes_no),
        FeatureSpec("thrombectomy", "categorical", yes_no),
    )


# ---------------------------------------------------------------------------- export


def cell_text(column: str, value: object, profile: SiteProfile) -> str:
    if column == "glucose_mmol_l":
        v = float(value)  # type: ignore[arg-type]
        return (str(round(v * MG_PER_DL_PER_MMOL_L)) if profile.glucose_unit == "mg/dl"
                else f"{v:.1f}")
    return str(value)


_UNPARSEABLE = {  # column -> how a hand-edited export garbles it
    "age": lambda v: f"{v}y",
    "nihss": lambda v: f"{v}?",
    "onset_to_door_min": lambda v: ">4h",
    "glucose_mmol_l": lambda v: v.replace(".", ",") if "." in v else f"{v} mg/dl",
    "systolic_bp": lambda v: f"{v}/90",
}
_UNKNOWN_LEVEL = {"sex": {"female": "F", "male": "M"}, "atrial_fibrillation": None,
                  "thrombolysis": None, "thrombectomy": None}


def write_table_csv(columns: Mapping[str, np.ndarray], path: Path, *, profile: SiteProfile,
                    rng: np.random.Generator) -> dict[str, int]:
    """Write a cohort as this site's export: its missing tokens and a few broken rows.

    Returns the skip reasons `load_table` (policy "mean") should report, by construction: each
    broken row carries exactly one defect, and the target is only ever blanked on purpose.
    """
    n = len(columns[DEMO_TARGET])
    rows = [[cell_text(c, columns[c][i], profile) for c in TABLE_COLUMNS] for i in range(n)]
    index = {c: j for j, c in enumerate(TABLE_COLUMNS)}
    for column, weight in MISSING_WEIGHT.items():
        rate = 1.0 if column in profile.unrecorded else min(1.0, profile.missing_rate * weight)
        for i in np.flatnonzero(rng.random(n) < rate):
            rows[i][index[column]] = profile.missing_token
    expected: Counter[str] = Counter()
    n_broken = 0 if profile.broken_row_rate == 0 else min(
        n, max(len(BROKEN_KINDS), round(profile.broken_row_rate * n)))
    numeric = list(_UNPARSEABLE)
    categorical = list(_UNKNOWN_LEVEL)
    for k, i in enumerate(rng.choice(n, size=n_broken, replace=False)):
        row = rows[i]
        kind = BROKEN_KINDS[k % len(BROKEN_KINDS)]
        if kind == "wrong_field_count":
            j = index["age"]  # "72,5": an unquoted decimal comma adds a field
            row[j:j + 1] = [cell_text("age", columns["age"][i], profile), "5"]
            expected[kind] += 1
        elif kind == "unparseable":
            column = numeric[int(rng.integers(len(numeric)))]
            text = cell_text(column, columns[column][i], profile)
            row[index[column]] = _UNPARSEABLE[column](text)
            expected[f"unparseable:{column}"] += 1
        elif kind == "unknown_level":
            column = categorical[int(rng.integers(len(categorical)))]
            value = str(columns[column][i])
            mapping = _UNKNOWN_LEVEL[column]
            row[index[column]] = mapping[value] if mapping else value[0].upper()
            expected[f"unknown_level:{column}"] += 1
        else:
            row[index[DEMO_TARGET]] = profile.missing_token  # lost to follow-up
            expected[kind] += 1
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(rows)
    return dict(sorted(expected.items()))

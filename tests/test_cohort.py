"""The synthetic stroke cohort generator: determinism, plausibility, effects, export."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from agent.config import SITE_ID_PATTERN
from agent.demo.cohort import (
    DEMO_TARGET,
    TABLE_COLUMNS,
    common_test_set,
    default_profiles,
    demo_features,
    generate_cohort,
    write_table_csv,
)
from agent.ingest.tables import load_table

PROFILES = default_profiles(3, 0)
CITY, VALLEY, RURAL = PROFILES


@pytest.fixture(scope="module")
def big() -> dict[str, dict[str, np.ndarray]]:
    """20,000 patients per default site: enough for stable rates, still well under a second."""
    rng = np.random.default_rng(7)
    return {p.name: generate_cohort(p, rng, 20_000, include_latent=True) for p in PROFILES}


def test_same_seed_same_cohort_and_other_seed_differs():
    a = generate_cohort(CITY, np.random.default_rng(1))
    b = generate_cohort(CITY, np.random.default_rng(1))
    c = generate_cohort(CITY, np.random.default_rng(2))
    assert list(a) == list(TABLE_COLUMNS)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["age"], c["age"])


def test_default_profiles_deterministic_named_and_shaped():
    assert [p.name for p in PROFILES] == ["city-csc", "valley-general", "north-rural"]
    assert [p.n_patients for p in PROFILES] == [1200, 400, 150]
    assert RURAL.thrombectomy_rate == 0.0 < VALLEY.thrombectomy_rate < CITY.thrombectomy_rate
    assert CITY.onset_to_door_median_min < VALLEY.onset_to_door_median_min
    assert VALLEY.onset_to_door_median_min < RURAL.onset_to_door_median_min
    many = default_profiles(9, 5)
    assert many == default_profiles(9, 5)
    assert many[:3] == PROFILES  # hand-written sites do not depend on the seed
    assert many[3:] != default_profiles(9, 6)[3:]
    assert len({p.name for p in many}) == 9
    assert all(SITE_ID_PATTERN.fullmatch(p.name) for p in many)
    assert all(p.thrombectomy_rate == 0.0 for p in many if p.name.startswith("rural-"))
    with pytest.raises(ValueError):
        default_profiles(0, 0)


@pytest.mark.parametrize("bad", [{"name": "City CSC"}, {"n_patients": 0},
                                 {"thrombolysis_rate": 1.5}, {"glucose_unit": "g/l"},
                                 {"unrecorded": ("good_outcome",)}])
def test_site_profile_validates(bad):
    with pytest.raises(ValueError):
        replace(CITY, **bad)


def test_values_in_plausible_ranges(big):
    for cohort in big.values():
        assert np.all((cohort["age"] >= 18) & (cohort["age"] <= 99))
        assert 60 <= np.median(cohort["age"]) <= 85
        assert np.all((cohort["nihss"] >= 0) & (cohort["nihss"] <= 42))
        assert 2 <= np.median(cohort["nihss"]) <= 10
        assert np.all((cohort["onset_to_door_min"] >= 10) & (cohort["onset_to_door_min"] <= 1440))
        assert np.all((cohort["glucose_mmol_l"] >= 2.2) & (cohort["glucose_mmol_l"] <= 30))
        assert 5.0 <= np.median(cohort["glucose_mmol_l"]) <= 8.0
        assert np.all((cohort["systolic_bp"] >= 80) & (cohort["systolic_bp"] <= 250))
        assert set(np.unique(cohort["prestroke_mrs"])) <= set(range(6))
        assert set(np.unique(cohort["sex"])) == {"female", "male"}
        for column in ("atrial_fibrillation", "thrombolysis", "thrombectomy"):
            assert set(np.unique(cohort[column])) <= {"no", "yes"}
        assert set(np.unique(cohort[DEMO_TARGET])) == {0, 1}
        assert 0.10 <= np.mean(cohort["atrial_fibrillation"] == "yes") <= 0.35


def test_patient_ids_synthetic_and_unique(big):
    for name, cohort in big.items():
        ids = cohort["patient_id"]
        assert len(set(ids)) == len(ids)
        assert all(i.startswith(f"SYN-{name}-") for i in ids)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_good_outcome_rate_believable(big, profile):
    assert 0.35 <= big[profile.name][DEMO_TARGET].mean() <= 0.60


def test_site_practice_shows_in_treatments(big):
    city, rural = big["city-csc"], big["north-rural"]
    assert np.all(rural["thrombectomy"] == "no")
    assert np.mean(city["thrombectomy"] == "yes") > 0.15
    assert np.mean(city["thrombolysis"] == "yes") > 2 * np.mean(rural["thrombolysis"] == "yes")
    assert np.mean(city["onset_to_door_min"] > 180) < 0.01  # the centre never sees late arrivals
    assert np.mean(rural["onset_to_door_min"] > 180) > 0.5
    for cohort in big.values():
        lysed = cohort["thrombolysis"] == "yes"
        assert np.all(cohort["onset_to_door_min"][lysed] < 270)  # no lysis beyond 4.5 h
        assert np.all(cohort["_lvo"][cohort["thrombectomy"] == "yes"])
        assert np.all(cohort["prestroke_mrs"][cohort["thrombectomy"] == "yes"] <= 2)


def test_thrombectomy_effect_present_among_severe_lvo_patients(big):
    # Compared within latent LVO: untreated severe non-LVO strokes are a different population
    # (confounding by indication), which the raw treated/untreated contrast would mix in.
    for name in ("city-csc", "valley-general"):
        c = big[name]
        severe = (c["_lvo"] & (c["nihss"] >= 10) & (c["onset_to_door_min"] <= 360)
                  & (c["prestroke_mrs"] <= 2))
        treated = severe & (c["thrombectomy"] == "yes")
        untreated = severe & (c["thrombectomy"] == "no")
        assert treated.sum() > 100 and untreated.sum() > 100
        assert c[DEMO_TARGET][treated].mean() > c[DEMO_TARGET][untreated].mean() + 0.05


def test_outcome_worsens_with_severity_age_and_prestroke_disability(big):
    c = np.concatenate([big[p.name][DEMO_TARGET] for p in PROFILES])
    nihss = np.concatenate([big[p.name]["nihss"] for p in PROFILES])
    age = np.concatenate([big[p.name]["age"] for p in PROFILES])
    mrs = np.concatenate([big[p.name]["prestroke_mrs"] for p in PROFILES])
    assert c[nihss <= 4].mean() > c[nihss >= 15].mean() + 0.3
    assert c[age < 65].mean() > c[age >= 85].mean() + 0.15
    assert c[mrs == 0].mean() > c[mrs >= 3].mean() + 0.3


def test_common_test_set_is_a_clean_equal_mixture():
    test = common_test_set(PROFILES, np.random.default_rng(3), n=2000)
    assert list(test) == list(TABLE_COLUMNS)
    assert all(len(v) == 2000 for v in test.values())
    origin = [pid.split("-")[2] for pid in test["patient_id"]]
    assert {k: origin.count(k) for k in set(origin)} == {"city": 667, "valley": 667, "north": 666}
    assert len(set(test["patient_id"])) == 2000
    rng_again = common_test_set(PROFILES, np.random.default_rng(3), n=2000)
    np.testing.assert_array_equal(test["nihss"], rng_again["nihss"])


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_written_csv_loads_with_expected_skip_reasons(tmp_path, profile):
    rng = np.random.default_rng(11)
    cohort = generate_cohort(profile, rng)
    path = tmp_path / f"{profile.name}.csv"
    expected = write_table_csv(cohort, path, profile=profile, rng=rng)
    table = load_table(path, demo_features(), DEMO_TARGET, "mean", "patient_id")
    assert table.skipped == expected
    assert {"wrong_field_count", "target_missing"} <= set(expected)
    assert any(k.startswith("unparseable:") for k in expected)
    assert any(k.startswith("unknown_level:") for k in expected)
    assert table.rows_read == profile.n_patients
    assert table.n_rows == profile.n_patients - sum(expected.values())
    assert table.x.shape[1] == 14
    assert all(i.startswith(f"SYN-{profile.name}-") for i in table.ids)
    missing = np.isnan(table.x[:, list(table.numeric_columns)]).mean()
    assert 0 < missing < 0.25
    with open(path, newline="") as fh:
        assert next(csv.reader(fh)) == list(TABLE_COLUMNS)


def test_site_that_never_records_prestroke_mrs_exports_only_missing(tmp_path):
    assert "prestroke_mrs" in VALLEY.unrecorded
    rng = np.random.default_rng(12)
    path = tmp_path / "valley.csv"
    write_table_csv(generate_cohort(VALLEY, rng), path, profile=VALLEY, rng=rng)
    table = load_table(path, demo_features(), DEMO_TARGET, "mean")
    assert np.all(np.isnan(table.x[:, table.columns.index("prestroke_mrs")]))


def test_clean_profile_writes_no_defects(tmp_path):
    clean = replace(CITY, missing_rate=0.0, broken_row_rate=0.0)
    rng = np.random.default_rng(13)
    cohort = generate_cohort(clean, rng, 300)
    assert write_table_csv(cohort, tmp_path / "c.csv", profile=clean, rng=rng) == {}
    table = load_table(tmp_path / "c.csv", demo_features(), DEMO_TARGET, "drop")
    assert table.n_rows == 300 and table.skipped == {}
    np.testing.assert_array_equal(table.y, cohort[DEMO_TARGET])
    np.testing.assert_allclose(table.x[:, table.columns.index("glucose_mmol_l")],
                               cohort["glucose_mmol_l"])


def test_glucose_unit_quirk_writes_mg_per_dl(tmp_path):
    quirky = replace(CITY, missing_rate=0.0, broken_row_rate=0.0, glucose_unit="mg/dl")
    rng = np.random.default_rng(14)
    cohort = generate_cohort(quirky, rng, 200)
    write_table_csv(cohort, tmp_path / "q.csv", profile=quirky, rng=rng)
    table = load_table(tmp_path / "q.csv", demo_features(), DEMO_TARGET, "mean")
    ratio = table.x[:, table.columns.index("glucose_mmol_l")] / cohort["glucose_mmol_l"]
    np.testing.assert_allclose(ratio, 18.016, rtol=0.02)

"""Clinical table ingest: encoding, skip reasons, file-level errors, robustness to garbage."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import FeatureSpec
from agent.errors import DataError, FedsiloError
from agent.ingest.tables import EncodedTable, encoded_columns, load_table

FEATURES = (
    FeatureSpec("age", "numeric"),
    FeatureSpec("sex", "categorical", ("female", "male")),
    FeatureSpec("nihss", "numeric"),
)
HEADER = "patient_id,good_outcome,age,sex,nihss\n"


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, missing: str = "mean", features=FEATURES, id_column="patient_id"):
    return load_table(path, features, "good_outcome", missing, id_column)


def test_csv_round_trip_encodes_values_one_hot_and_ids(tmp_path):
    path = write(tmp_path, HEADER + "P1,1,71.5,male,4\nP2,0,80,female,12\n")
    t = load(path)
    assert isinstance(t, EncodedTable)
    assert t.columns == ("age", "sex=female", "sex=male", "nihss")
    assert t.columns == encoded_columns(FEATURES)
    assert t.numeric_columns == (0, 3)
    assert t.x.dtype == np.float64 and t.x.shape == (2, 4)
    assert t.y.dtype == np.float32
    np.testing.assert_array_equal(t.x, [[71.5, 0, 1, 4], [80, 1, 0, 12]])
    np.testing.assert_array_equal(t.y, [1, 0])
    assert t.ids == ("P1", "P2")
    assert t.rows_read == 2 and t.skipped == {}


def test_ids_are_none_without_id_column(tmp_path):
    t = load(write(tmp_path, HEADER + "P1,1,71,male,4\n"), id_column=None)
    assert t.ids is None and t.n_rows == 1


def test_extra_columns_and_column_order_do_not_matter(tmp_path):
    text = "nihss,comment,sex,age,good_outcome,patient_id\n4,ok,male,71,1,P1\n"
    t = load(write(tmp_path, text))
    np.testing.assert_array_equal(t.x, [[71, 0, 1, 4]])


def test_parquet_round_trip_matches_csv(tmp_path):
    table = pa.table({
        "patient_id": ["P1", "P2", "P3", "P4"],
        "good_outcome": [True, False, None, True],
        "age": [71.5, None, 60.0, float("nan")],
        "sex": ["male", "female", "male", None],
        "nihss": pa.array([4, 12, 3, 7], type=pa.int32()),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    t = load(tmp_path / "t.parquet")
    csv_t = load(write(tmp_path, HEADER + "P1,1,71.5,male,4\nP2,0,,female,12\nP3,,60,male,3\n"
                                          "P4,true,NaN,,7\n"))
    np.testing.assert_array_equal(t.x, csv_t.x)  # NaN positions equal too
    np.testing.assert_array_equal(t.y, csv_t.y)
    assert t.ids == csv_t.ids == ("P1", "P2", "P4")
    assert t.skipped == csv_t.skipped == {"target_missing": 1}
    assert t.rows_read == csv_t.rows_read == 4


def test_parquet_header_missing_column_names_it(tmp_path):
    pq.write_table(pa.table({"good_outcome": [1], "age": [1.0], "sex": ["male"]}),
                   tmp_path / "t.parquet")
    with pytest.raises(DataError, match="'nihss'"):
        load(tmp_path / "t.parquet", id_column=None)


@pytest.mark.parametrize(("row", "reason"), [
    ("P9,1,71,male", "wrong_field_count"),
    ("P9,1,71,male,4,extra", "wrong_field_count"),
    ("P9,,71,male,4", "target_missing"),
    ("P9,NA,71,male,4", "target_missing"),
    ("P9,maybe,71,male,4", "target_invalid"),
    ("P9,2,71,male,4", "target_invalid"),
    ("P9,1,7O,male,4", "unparseable:age"),
    ('P9,1,"71,5",male,4', "unparseable:age"),
    ("P9,1,71,male,>4", "unparseable:nihss"),
    ("P9,1,71,M,4", "unknown_level:sex"),
    ("P9,1,inf,male,4", "non_finite:age"),
    ("P9,1,-Infinity,male,4", "non_finite:age"),
    ("P9,1,71,male,1e999", "non_finite:nihss"),
])
def test_each_skip_reason_is_counted_and_valid_rows_kept(tmp_path, row, reason):
    path = write(tmp_path, HEADER + "P1,1,71,male,4\n" + row + "\nP2,0,80,female,12\n")
    t = load(path)
    assert t.skipped == {reason: 1}
    assert t.ids == ("P1", "P2")
    assert t.rows_read == 3


def test_malformed_line_the_csv_module_refuses_is_skipped(tmp_path):
    huge = "x" * (csv.field_size_limit() + 10)
    t = load(write(tmp_path, HEADER + f"P1,1,71,male,4\nP9,1,{huge},male,4\nP2,0,80,female,12\n"))
    assert t.skipped == {"malformed_line": 1}
    assert t.ids == ("P1", "P2")


def test_counts_add_up_over_many_defects(tmp_path):
    rows = ["P1,1,71,male,4", "bad", "P2,,1,male,1", "P3,1,x,male,1", "P4,1,1,x,1",
            "P5,1,1,male,nan", "P6,0,60,female,2", "P7,1,1,male,inf", "P8,1,1,male"]
    t = load(write(tmp_path, HEADER + "\n".join(rows) + "\n"))
    assert t.skipped == {"wrong_field_count": 2, "target_missing": 1, "unparseable:age": 1,
                         "unknown_level:sex": 1, "non_finite:nihss": 1}
    assert t.rows_read == len(rows) == t.n_rows + sum(t.skipped.values())
    assert t.ids == ("P1", "P5", "P6")


def test_first_failing_feature_in_declared_order_is_the_reason(tmp_path):
    t = load(write(tmp_path, HEADER + "P1,1,x,M,y\n"))
    assert t.skipped == {"unparseable:age": 1}


def test_policy_mean_keeps_missing_as_nan_and_zero_one_hot(tmp_path):
    t = load(write(tmp_path, HEADER + "P1,1,,NA,4\n"), missing="mean")
    assert math.isnan(t.x[0, 0])
    np.testing.assert_array_equal(t.x[0, 1:], [0, 0, 4])


def test_policy_drop_skips_missing_with_column_reason(tmp_path):
    text = HEADER + "P1,1,,male,4\nP2,1,70,null,4\nP3,0,70,male,4\n"
    t = load(write(tmp_path, text), missing="drop")
    assert t.skipped == {"missing:age": 1, "missing:sex": 1}
    assert t.ids == ("P3",)
    assert not np.isnan(t.x).any()


@pytest.mark.parametrize("token", ["", "NA", "n/a", "N/A", "NaN", "nan", "null", "NULL", "None",
                                   ".", "  NA  "])
def test_missing_tokens_are_case_insensitive(tmp_path, token):
    t = load(write(tmp_path, HEADER + f"P1,1,{token},{token},4\n"), missing="drop")
    assert t.skipped == {"missing:age": 1}


def test_one_hot_follows_declared_level_order(tmp_path):
    path = write(tmp_path, HEADER + "P1,1,71,male,4\nP2,1,71,female,4\n")
    swapped = (FEATURES[0], FeatureSpec("sex", "categorical", ("male", "female")), FEATURES[2])
    t = load(path, features=swapped)
    assert t.columns == ("age", "sex=male", "sex=female", "nihss")
    np.testing.assert_array_equal(t.x[:, 1:3], [[1, 0], [0, 1]])


def test_category_match_strips_and_ignores_case(tmp_path):
    t = load(write(tmp_path, HEADER + "P1,1,71, Male ,4\nP2,1,71,FEMALE,4\n"))
    np.testing.assert_array_equal(t.x[:, 1:3], [[0, 1], [1, 0]])


def test_exact_level_wins_over_case_folded_one(tmp_path):
    features = (FeatureSpec("grade", "categorical", ("a", "A", "b")),)
    path = write(tmp_path, "y,grade\n1,A\n1,a\n1,B\n")
    t = load_table(path, features, "y", "mean")
    np.testing.assert_array_equal(t.x, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("0", 0), ("true", 1), ("False", 0),
                                             ("YES", 1), ("no", 0), ("1.0", 1), (" 0 ", 0)])
def test_target_spellings(tmp_path, text, value):
    t = load(write(tmp_path, HEADER + f"P1,{text},71,male,4\n"))
    np.testing.assert_array_equal(t.y, [value])


def test_semicolon_delimited_export(tmp_path):
    t = load(write(tmp_path, "patient_id;good_outcome;age;sex;nihss\nP1;1;71;male;4\n"))
    np.testing.assert_array_equal(t.x, [[71, 0, 1, 4]])


def test_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.replace("\n", "\r\n").encode()
                     + b"P1,1,71,male,4\r\n\r\n\r\nP2,0,80,female,12\r\n\r\n")
    t = load(path)
    assert t.ids == ("P1", "P2") and t.rows_read == 2


def test_stray_quote_does_not_swallow_following_rows(tmp_path):
    text = HEADER + 'P1,1,71,male,4\nP9,1,"71,male,4\nP2,0,80,female,12\nP3,1,60,male,2\n'
    t = load(write(tmp_path, text))
    assert t.ids == ("P1", "P2", "P3")
    assert t.skipped == {"wrong_field_count": 1}


def test_multi_line_free_text_cell_is_kept(tmp_path):
    text = "patient_id,good_outcome,age,sex,nihss,note\nP1,1,71,male,4,\"line one\nline two\"\n"
    t = load(write(tmp_path, text))
    assert t.ids == ("P1",) and t.skipped == {}


def test_non_utf8_bytes_fail_only_their_cell(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(HEADER.encode() + b"P1,1,71,m\xe4le,4\nP2,0,80,female,12\n")
    t = load(path)
    assert t.skipped == {"unknown_level:sex": 1} and t.ids == ("P2",)


def test_nul_byte_in_a_row_fails_only_that_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(HEADER.encode() + b"P1,1,7\x001,male,4\nP2,0,80,female,12\n")
    t = load(path)
    assert t.skipped == {"unparseable:age": 1} and t.ids == ("P2",)


def test_header_missing_column_raises_naming_file_and_column(tmp_path):
    path = write(tmp_path, "patient_id,good_outcome,age,sex\nP1,1,71,male\n")
    with pytest.raises(DataError, match="nihss") as info:
        load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, FedsiloError)


def test_missing_target_column_raises(tmp_path):
    with pytest.raises(DataError, match="good_outcome"):
        load(write(tmp_path, "patient_id,age,sex,nihss\nP1,71,male,4\n"))


def test_duplicate_required_column_raises(tmp_path):
    with pytest.raises(DataError, match="'age' appears 2 times"):
        load(write(tmp_path, "patient_id,good_outcome,age,sex,nihss,age\n"))


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "absent.csv", "file not found"),
    (lambda p: p, "is a directory"),
    (lambda p: write(p, ""), "empty file"),
    (lambda p: write(p, "\n\n  \n"), "empty file"),
    (lambda p: (p / "x.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00") and p / "x.csv",
     "binary content"),
    (lambda p: (p / "x.csv").write_bytes(HEADER.encode("utf-16")) and p / "x.csv", "UTF-16"),
    (lambda p: write(p, "not,parquet\n", "x.parquet"), "not a Parquet file"),
    (lambda p: (p / "x.parquet").write_bytes(b"PAR1garbage") and p / "x.parquet",
     "unreadable Parquet"),
])
def test_unusable_files_raise_data_error(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load(make(tmp_path))


def test_header_only_gives_empty_table(tmp_path):
    t = load(write(tmp_path, HEADER))
    assert t.x.shape == (0, 4) and t.y.shape == (0,) and t.rows_read == 0


def test_log_has_reasons_and_counts_but_no_values(tmp_path, caplog):
    path = write(tmp_path, HEADER + "SECRET-ID,1,SECRET-AGE,male,4\nP2,0,80,female,12\n")
    with caplog.at_level(logging.INFO, logger="agent.ingest.tables"):
        load(path)
    assert "unparseable:age=1" in caplog.text
    assert "SECRET" not in caplog.text


def test_invalid_policy_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        load(write(tmp_path, HEADER), missing="zero")


VALID = [(f"V{k}", k % 2, 40 + k, ("female", "male")[k % 2], k % 30) for k in range(12)]
# Anything a broken export or a hand edit could leave: quotes, separators, numbers, stray
# carriage returns, NUL and non-ASCII bytes. Uppercase "V" is left out so no garbage line can
# impersonate a valid row's id.
garbage_line = st.text(alphabet=st.sampled_from(list("abcxyz019.,;\"' \t\r-+eE/\\\x00é∞")),
                       max_size=40)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(garbage_line, max_size=12), seed=st.integers(0, 2**32 - 1))
def test_garbage_lines_never_raise_and_valid_rows_survive(tmp_path, garbage, seed):
    lines = [f"{i},{y},{a},{s},{n}" for i, y, a, s, n in VALID] + garbage
    order = np.random.default_rng(seed).permutation(len(lines))
    path = write(tmp_path, HEADER + "\n".join(lines[k] for k in order) + "\n", "fuzz.csv")
    t = load(path)
    assert t.rows_read == t.n_rows + sum(t.skipped.values())
    kept = {pid: (t.y[r], *t.x[r]) for r, pid in enumerate(t.ids)}
    for pid, y, age, sex, nihss in VALID:
        assert kept[pid] == (y, age, float(sex == "female"), float(sex == "male"), nihss)


def test_without_target_every_row_is_read_and_row_numbers_are_kept(tmp_path):
    """Scoring new patients (`fedsilo predict`): no outcome column needed, y is NaN, and each
    kept row says where it was (blank lines are not rows)."""
    text = "patient_id,age,sex,nihss\nP1,71,male,4\n\nP2,x,male,4\nP3,80,female,12\n"
    t = load_table(write(tmp_path, text), FEATURES, None, "mean", "patient_id")
    assert t.ids == ("P1", "P3") and t.skipped == {"unparseable:age": 1}
    np.testing.assert_array_equal(t.row_numbers, [1, 3])
    assert t.y.shape == (2,) and np.isnan(t.y).all()
    pq.write_table(pa.table({"age": [71.0, None, 80.0], "sex": ["male", "male", "dog"],
                             "nihss": [4, 5, 12]}), tmp_path / "t.parquet")
    p = load_table(tmp_path / "t.parquet", FEATURES, None, "mean")
    assert p.skipped == {"unknown_level:sex": 1}
    np.testing.assert_array_equal(p.row_numbers, [1, 2])
    with_target = load(write(tmp_path, HEADER + "P1,,71,male,4\nP2,1,80,female,12\n"))
    np.testing.assert_array_equal(with_target.row_numbers, [2])


def test_read_header_reads_only_the_header(tmp_path):
    from agent.ingest.tables import read_header

    assert read_header(write(tmp_path, "\na;b;c\n1;2\n")) == ("a", "b", "c")
    pq.write_table(pa.table({"x": [1], "y": [2]}), tmp_path / "t.parquet")
    assert read_header(tmp_path / "t.parquet") == ("x", "y")
    with pytest.raises(DataError, match="empty file"):
        read_header(write(tmp_path, "\n \n"))

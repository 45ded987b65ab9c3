"""Clinical tables (CSV, Parquet) -> one encoded float matrix a site can train on.

Hospital exports are messy, so the rules are: a problem with the *file* (unreadable, not a table,
a required column absent from the header) raises `DataError`; a problem with a *row* never raises
— the row is skipped and counted under a PHI-free reason code (column names only, never values).
Each skipped row gets exactly one reason, the first one found in this order: field count, target,
then features in declared order. So `rows_read == len(y) + sum(skipped.values())`.

CSV goes through the stdlib `csv` module record by record. A record that spans several physical
lines (a stray quote) and does not parse into a valid row is re-read line by line, so one broken
line can never swallow or abort the rest of the file. Bytes that are not UTF-8 are replaced
(U+FFFD) and then fail the cell they are in. The delimiter is `,` unless the header only splits
into the required columns with `;` or a tab (common in European exports); decimal commas are not
accepted either way (`unparseable:<column>`).

Encoding: numeric features are their float value (NaN where missing under policy "mean", to be
imputed after standardisation); categorical features are one-hot over the declared levels in
declared order (all zeros where missing under "mean"). Under policy "drop" a missing feature
skips the row as `missing:<column>`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.config import FeatureSpec
from agent.errors import DataError

logger = logging.getLogger(__name__)

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "."})
TARGET_TRUE = frozenset({"1", "1.0", "true", "yes"})
TARGET_FALSE = frozenset({"0", "0.0", "false", "no"})
PARQUET_MAGIC = b"PAR1"
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_DELIMITERS = (",", ";", "\t")
BINARY_CONTROL_SHARE = 0.05  # share of control bytes in the first 8 KiB that marks a binary file

# Skip reason codes. Column-specific ones are "<code>:<column>".
WRONG_FIELD_COUNT = "wrong_field_count"
MALFORMED_LINE = "malformed_line"  # the csv module itself refused the line (e.g. field too large)
TARGET_MISSING = "target_missing"
TARGET_INVALID = "target_invalid"
UNPARSEABLE = "unparseable"
UNKNOWN_LEVEL = "unknown_level"
MISSING = "missing"
NON_FINITE = "non_finite"


@dataclass(frozen=True, eq=False)
class EncodedTable:
    """A site's table after encoding; what the trainer and the moments exchange consume."""

    x: np.ndarray  # float64 [n, d]
    y: np.ndarray  # float32 [n], 0.0 / 1.0
    ids: tuple[str, ...] | None
    columns: tuple[str, ...]
    numeric_columns: tuple[int, ...]
    rows_read: int
    skipped: dict[str, int]
    row_numbers: np.ndarray  # int64 [n]: each kept row's 1-based position among the data rows

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])


def encoded_columns(features: Sequence[FeatureSpec]) -> tuple[str, ...]:
    """Names of the encoded columns, so the coordinator knows the model width without data."""
    out: list[str] = []
    for f in features:
        if f.type == "categorical":
            out.extend(f"{f.name}={level}" for level in f.levels)
        else:
            out.append(f.name)
    return tuple(out)


def numeric_column_indices(features: Sequence[FeatureSpec]) -> tuple[int, ...]:
    """Indices into the encoded matrix of the numeric features (the ones to standardise)."""
    out: list[int] = []
    pos = 0
    for f in features:
        if f.type == "categorical":
            pos += len(f.levels)
        else:
            out.append(pos)
            pos += 1
    return tuple(out)


def load_table(path: Path, features: tuple[FeatureSpec, ...], target: str | None, missing: str,
               id_column: str | None = None) -> EncodedTable:
    """Read and encode a CSV or Parquet table; bad rows are skipped and counted, never raised.

    `target=None` reads a table without outcomes (scoring new patients): y is then all NaN."""
    path = Path(path)
    if missing not in ("mean", "drop"):
        raise ValueError(f"missing policy must be 'mean' or 'drop', got {missing!r}")
    _check_features(features, target, id_column)
    encoder = _RowEncoder(features, missing)
    if _is_parquet(path):
        rows_read, out = _load_parquet(path, encoder, target, id_column)
    else:
        rows_read, out = _load_csv(path, encoder, target, id_column)
    table = out.finish(encoder, rows_read, with_ids=id_column is not None)
    _log_summary(path, table)
    return table


def read_header(path: Path) -> tuple[str, ...]:
    """The column names of a CSV or Parquet table, reading only its header (or Parquet
    schema): enough to refuse an unreadable table up front (`fedsilo config check`)."""
    path = Path(path)
    if _is_parquet(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return tuple(pq.read_schema(path).names)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable Parquet file ({type(exc).__name__})") from None
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            first = _first_line(path, fh)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    rows = [_single_line(first, d) for d in CSV_DELIMITERS]
    best = max((r for r in rows if r is not None), key=len, default=None)
    if best is None:
        raise DataError(f"{path}: header line cannot be parsed as CSV")
    return tuple(h.strip() for h in best)


# ---------------------------------------------------------------------------- cell parsing


class _Missing:
    """Sentinel for a missing cell (distinct from any parsed value)."""


_MISSING = _Missing()


def _is_missing_text(s: str) -> bool:
    return s.strip().lower() in MISSING_TOKENS


def _parse_number(v: Any) -> float | _Missing | str:
    """Float value, the missing sentinel, or a reason stem ('unparseable' / 'non_finite')."""
    if v is None:
        return _MISSING
    if isinstance(v, str):
        s = v.strip()
        if s.lower() in MISSING_TOKENS:
            return _MISSING
        try:
            value = float(s)
        except ValueError:
            return UNPARSEABLE
        return value if math.isfinite(value) else NON_FINITE
    if isinstance(v, (bool, int, float, Decimal, np.number)):
        value = float(v)
        if math.isnan(value):
            return _MISSING  # Parquet writers (pandas) store missing floats as NaN
        return value if math.isfinite(value) else NON_FINITE
    return UNPARSEABLE


def _category_text(v: Any) -> str | _Missing:
    if v is None:
        return _MISSING
    if isinstance(v, float):
        if math.isnan(v):
            return _MISSING
        if v.is_integer():
            return str(int(v))  # levels "0"/"1" stored in a float column
    s = str(v).strip()
    return _MISSING if s.lower() in MISSING_TOKENS else s


def _parse_target(v: Any) -> float | str:
    """0.0 / 1.0, or a reason code."""
    if isinstance(v, (bool, int, float, Decimal, np.number)):
        value = float(v)
        if math.isnan(value):
            return TARGET_MISSING
        return value if value in (0.0, 1.0) else TARGET_INVALID
    if v is None:
        return TARGET_MISSING
    s = str(v).strip().lower()
    if s in MISSING_TOKENS:
        return TARGET_MISSING
    if s in TARGET_TRUE:
        return 1.0
    if s in TARGET_FALSE:
        return 0.0
    return TARGET_INVALID


class _RowEncoder:
    """Turns one row's feature cells into encoded floats, or says why the row is skipped."""

    def __init__(self, features: Sequence[FeatureSpec], missing: str) -> None:
        self.features = tuple(features)
        self.drop = missing == "drop"
        self.columns = encoded_columns(features)
        self.numeric = numeric_column_indices(features)
        self.width = len(self.columns)
        self.lookups: list[tuple[dict[str, int], dict[str, int]] | None] = []
        for f in self.features:
            if f.type != "categorical":
                self.lookups.append(None)
                continue
            exact = {level: i for i, level in enumerate(f.levels)}
            folded_count = Counter(level.casefold() for level in f.levels)
            folded = {level.casefold(): i for i, level in enumerate(f.levels)
                      if folded_count[level.casefold()] == 1}
            self.lookups.append((exact, folded))

    def encode(self, cells: Sequence[Any]) -> list[float] | str:
        """`cells` are the feature values in declared order."""
        out: list[float] = []
        for f, lookup, cell in zip(self.features, self.lookups, cells, strict=True):
            if lookup is None:
                value = _parse_number(cell)
                if value is _MISSING:
                    if self.drop:
                        return f"{MISSING}:{f.name}"
                    out.append(math.nan)
                elif isinstance(value, str):
                    return f"{value}:{f.name}"
                else:
                    out.append(value)  # type: ignore[arg-type]
                continue
            text = _category_text(cell)
            if isinstance(text, _Missing):
                if self.drop:
                    return f"{MISSING}:{f.name}"
                out.extend([0.0] * len(f.levels))
                continue
            exact, folded = lookup
            idx = exact.get(text)
            if idx is None:
                idx = folded.get(text.casefold())
            if idx is None:
                return f"{UNKNOWN_LEVEL}:{f.name}"
            one_hot = [0.0] * len(f.levels)
            one_hot[idx] = 1.0
            out.extend(one_hot)
        return out


def numeric_value(cell: Any) -> float:
    """One numeric cell read as training reads it (NaN when missing), for scoring single rows
    outside a table; ValueError with the reason ("unparseable", "non_finite") otherwise."""
    value = _parse_number(cell)
    if isinstance(value, _Missing):
        return math.nan
    if isinstance(value, str):
        raise ValueError(value)
    return float(value)


def category_value(cell: Any) -> str:
    """One categorical cell as training reads it: the trimmed text, "" when missing."""
    text = _category_text(cell)
    return "" if isinstance(text, _Missing) else text


_NO_TARGET = object()  # the target cell of a table read without outcomes


class _Accumulator:
    """Collects kept rows and skip counts while a file is read."""

    def __init__(self) -> None:
        self.rows: list[list[float]] = []
        self.targets: list[float] = []
        self.ids: list[str] = []
        self.row_numbers: list[int] = []
        self.skipped: Counter[str] = Counter()

    def add(self, encoder: _RowEncoder, target: Any, feature_cells: Sequence[Any],
            id_cell: Any, row_number: int) -> None:
        y = math.nan if target is _NO_TARGET else _parse_target(target)
        if isinstance(y, str):
            self.skipped[y] += 1
            return
        encoded = encoder.encode(feature_cells)
        if isinstance(encoded, str):
            self.skipped[encoded] += 1
            return
        self.rows.append(encoded)
        self.targets.append(y)
        self.row_numbers.append(row_number)
        if id_cell is not None:
            text = _category_text(id_cell)
            self.ids.append(text if isinstance(text, str) else "")
        else:
            self.ids.append("")

    def finish(self, encoder: _RowEncoder, rows_read: int, *, with_ids: bool) -> EncodedTable:
        x = np.array(self.rows, dtype=np.float64).reshape(len(self.rows), encoder.width)
        return EncodedTable(
            x=x,
            y=np.array(self.targets, dtype=np.float32),
            ids=tuple(self.ids) if with_ids else None,
            columns=encoder.columns,
            numeric_columns=encoder.numeric,
            rows_read=rows_read,
            skipped=dict(sorted(self.skipped.items())),
            row_numbers=np.array(self.row_numbers, dtype=np.int64),
        )


# ---------------------------------------------------------------------------- file formats


def _check_features(features: Sequence[FeatureSpec], target: str | None,
                    id_column: str | None) -> None:
    if not features:
        raise ValueError("at least one feature is required")
    for f in features:
        if f.type not in ("numeric", "categorical"):
            raise ValueError(f"feature {f.name!r}: unknown type {f.type!r}")
        if f.type == "categorical" and len(f.levels) < 1:
            raise ValueError(f"feature {f.name!r}: categorical without levels")
    names = [f.name for f in features] + _required((), target, id_column)
    if len(set(names)) != len(names):
        raise ValueError("feature, target and id column names must be distinct")


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(8192)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a CSV or Parquet table") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _is_parquet(path: Path) -> bool:
    """Parquet by its magic; anything else must be UTF-8 text (a CSV), or it is refused."""
    head = _read_head(path)
    if head.startswith(PARQUET_MAGIC):
        return True
    if path.suffix.lower() in PARQUET_SUFFIXES:
        raise DataError(f"{path}: not a Parquet file (no PAR1 magic)")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: UTF-16 text; export the table as UTF-8 CSV")
    if _looks_binary(head):
        raise DataError(f"{path}: binary content, not a CSV or Parquet table")
    return False


def _looks_binary(head: bytes) -> bool:
    """NUL in the header line, or many control bytes: a NUL in some data row is only that row's
    problem (its cell fails to parse), never a reason to refuse the whole file."""
    if b"\x00" in head.split(b"\n", 1)[0]:
        return True
    control = sum(1 for byte in head if byte < 0x20 and byte not in b"\t\n\r\f")
    return control > BINARY_CONTROL_SHARE * max(len(head), 1)


def _required(features: Sequence[FeatureSpec], target: str | None,
              id_column: str | None) -> list[str]:
    return [*([target] if target else []), *(f.name for f in features),
            *([id_column] if id_column else [])]


def _locate(path: Path, header: Sequence[str], required: Sequence[str]) -> dict[str, int]:
    where: dict[str, int] = {}
    for name in required:
        hits = [i for i, h in enumerate(header) if h == name]
        if not hits:
            raise DataError(f"{path}: required column {name!r} is missing from the header")
        if len(hits) > 1:
            raise DataError(f"{path}: column {name!r} appears {len(hits)} times in the header")
        where[name] = hits[0]
    return where


def _load_parquet(path: Path, encoder: _RowEncoder, target: str | None,
                  id_column: str | None) -> tuple[int, _Accumulator]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    required = _required(encoder.features, target, id_column)
    try:
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
        _locate(path, names, required)
        table = pf.read(columns=required)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable Parquet file ({type(exc).__name__})") from None
    columns = {name: table.column(name).to_pylist() for name in required}
    out = _Accumulator()
    feature_names = [f.name for f in encoder.features]
    for i in range(table.num_rows):
        out.add(encoder, columns[target][i] if target else _NO_TARGET,
                [columns[n][i] for n in feature_names],
                columns[id_column][i] if id_column else None, i + 1)
    return table.num_rows, out


class _LineTap:
    """Feeds physical lines to csv.reader and remembers those of the current record."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh
        self.taken: list[str] = []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self.fh)
        self.taken.append(line)
        return line


def _records(fh: IO[str], delimiter: str, width: int,
             read: Sequence[int]) -> Iterator[list[str] | None]:
    """Yield records; None for a line the csv module refused.

    A record spanning several physical lines is re-split into its lines unless it has the header's
    width and none of the columns we `read` holds a line break: a line break is only plausible
    inside a free-text column, so this is how a stray quote is kept from swallowing good rows.
    """
    tap = _LineTap(fh)
    reader = csv.reader(tap, delimiter=delimiter)
    while True:
        tap.taken.clear()
        try:
            row: list[str] | None = next(reader)
        except StopIteration:
            return
        except csv.Error:
            row = None
        lines = list(tap.taken)
        if len(lines) > 1 and (row is None or len(row) != width
                               or any("\n" in row[i] or "\r" in row[i] for i in read)):
            for line in lines:
                yield _single_line(line, delimiter)
        else:
            yield row


def _single_line(line: str, delimiter: str) -> list[str] | None:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return None


def _pick_delimiter(first_line: str, required: Sequence[str]) -> str:
    for delim in CSV_DELIMITERS:
        names = {c.strip() for c in _single_line(first_line, delim) or []}
        if all(r in names for r in required):
            return delim
    return ","


def _first_line(path: Path, fh: IO[str]) -> str:
    """The header: the first line that is not blank."""
    for line in fh:
        if line.strip():
            return line
    raise DataError(f"{path}: empty file, expected a header line")


def _load_csv(path: Path, encoder: _RowEncoder, target: str | None,
              id_column: str | None) -> tuple[int, _Accumulator]:
    required = _required(encoder.features, target, id_column)
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            first = _first_line(path, fh)
            delimiter = _pick_delimiter(first, required)
            header_row = _single_line(first, delimiter)
            if header_row is None:
                raise DataError(f"{path}: header line cannot be parsed as CSV")
            header = [h.strip() for h in header_row]
            where = _locate(path, header, required)
            t_idx = where[target] if target else None
            f_idx = [where[f.name] for f in encoder.features]
            id_idx = where[id_column] if id_column else None
            width = len(header)
            out = _Accumulator()
            rows_read = 0
            read = [where[name] for name in required]
            for row in _records(fh, delimiter, width, read):
                if row is not None and (not row or (len(row) == 1 and not row[0].strip())):
                    continue  # blank line: not a row
                rows_read += 1
                if row is None:
                    out.skipped[MALFORMED_LINE] += 1
                elif len(row) != width:
                    out.skipped[WRONG_FIELD_COUNT] += 1
                else:
                    out.add(encoder, row[t_idx] if t_idx is not None else _NO_TARGET,
                            [row[i] for i in f_idx],
                            row[id_idx] if id_idx is not None else None, rows_read)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return rows_read, out


def _log_summary(path: Path, table: EncodedTable) -> None:
    """Counts and reason codes only: cell values may be PHI and never reach a log."""
    if table.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in table.skipped.items())
        logger.warning("%s: kept %d of %d rows; skipped %s", path.name, table.n_rows,
                       table.rows_read, reasons)
    else:
        logger.info("%s: kept all %d rows", path.name, table.rows_read)

"""Score a table with a saved model (`fedsilo predict`): P(outcome) per row, AUC when labelled.

Why a command: a hospital wants the federation's model applied to its own patients without
writing Python. The table is read exactly as training read it (`load_table`: same encoding,
same skip reasons), standardised with the model's federated mean and scale, then scored by the
same forward pass the sites evaluate with. Nothing here sends anything anywhere.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.config import FeatureSpec, Plan, plan_from_dict
from agent.errors import ConfigError, DataError
from agent.ingest.tables import encoded_columns, load_table, read_header
from agent.learn import metrics
from agent.learn.kinds import kind_names, model_kind
from agent.learn.modelfile import SavedModel, load_model
from agent.learn.models import predict_proba
from agent.learn.standardize import apply_standardization

WHERE = "fedsilo predict"


@dataclass(frozen=True, eq=False)
class Scores:
    """One probability per kept row, keyed by the table's id column or its row number."""

    key_column: str  # the id column's name, or "row"
    keys: tuple[str, ...]
    probability: np.ndarray  # float32 [n]
    labelled: bool  # the table had the plan's target column
    auc: float | None  # None without labels; NaN when only one outcome class was scored
    rows_read: int
    skipped: dict[str, int]


def load_scoring_model(directory: Path) -> tuple[SavedModel, Plan]:
    """The saved model and its plan, checked to be a table-only model whose columns are the
    plan's; anything else is a ConfigError on --model (exit 2)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(WHERE, "--model", f"{directory}: no such directory (the coordinator "
                                            f"writes its model to <state_dir>/model/)")
    if not (directory / "model.json").is_file():
        raise ConfigError(WHERE, "--model", f"{directory}: no model.json in this directory")
    try:
        model = load_model(directory)
    except DataError as exc:
        raise ConfigError(WHERE, "--model", str(exc)) from None
    if model.layout.model_kind.reads_images:
        tables = ", ".join(n for n in kind_names() if not model_kind(n).reads_images)
        raise ConfigError(WHERE, "--model", f"{directory}: a {model.layout.kind} model also "
                                            "needs each patient's images; scoring imaging "
                                            "models is not supported by this command yet "
                                            f"(table-only models: {tables})")
    if not isinstance(model.plan, dict):
        raise ConfigError(WHERE, "--model", f"{directory}/model.json: plan is not an object")
    plan = plan_from_dict(model.plan, file=f"{directory}/model.json plan")
    columns = model.columns
    if columns != encoded_columns(plan.features) or model.layout.n_inputs != len(columns) \
            or model.mean.shape != (len(columns),) or model.scale.shape != (len(columns),):
        raise ConfigError(WHERE, "--model", f"{directory}/model.json: columns, standardization "
                                            "and layout disagree with each other or the plan")
    return model, plan


def score_table(model: SavedModel, plan: Plan, table: Path, kernels: ModuleType,
                id_column: str | None = None) -> Scores:
    """Read `table` as training would and score every usable row. With the plan's target
    among the columns, rows without a valid label are skipped (like training) and the AUC
    covers exactly the scored rows."""
    table = Path(table)
    try:
        labelled = plan.target in read_header(table)
        t = load_table(table, plan.features, plan.target if labelled else None, plan.missing,
                       id_column)
    except DataError as exc:
        raise ConfigError(WHERE, "--table", str(exc)) from None
    except ValueError as exc:  # e.g. --id-column names a feature or the target
        raise ConfigError(WHERE, "--id-column", str(exc)) from None
    if t.n_rows == 0:
        raise DataError(f"{table}: no usable rows of {t.rows_read} (skipped: "
                        f"{_reasons(t.skipped)})")
    x = apply_standardization(t.x, model.mean, model.scale)
    p = np.asarray(predict_proba(model.layout, model.params, x, kernels), dtype=np.float32)
    keys = t.ids if t.ids is not None else tuple(str(n) for n in t.row_numbers)
    return Scores(key_column=id_column or "row", keys=keys, probability=p, labelled=labelled,
                  auc=metrics.roc_auc(t.y, p) if labelled else None, rows_read=t.rows_read,
                  skipped=t.skipped)


def scores_csv(scores: Scores) -> str:
    """`<id column or row>,probability`; 9 significant digits give back the float32 exactly."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([scores.key_column, "probability"])
    for key, p in zip(scores.keys, scores.probability.tolist(), strict=True):
        w.writerow([key, f"{p:.9g}"])
    return buf.getvalue()


def summary(scores: Scores) -> list[str]:
    """What an operator reads after a run: counts by skip reason, then the AUC if labelled."""
    n = len(scores.keys)
    lines = [f"scored {n} of {scores.rows_read} rows; skipped: {_reasons(scores.skipped)}"]
    if scores.auc is None:
        lines.append("no label column in the table: AUC not computed")
    elif np.isnan(scores.auc):
        lines.append(f"AUC undefined: only one outcome class among the {n} scored rows")
    else:
        lines.append(f"AUC {scores.auc:.4f} over {n} rows")
    return lines


def _reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"


def run_predict(model_dir: Path, table: Path, out: Path | None = None,
                id_column: str | None = None) -> int:
    """`fedsilo predict`: the CSV to `out` (summary on stdout) or to stdout (summary on
    stderr, so the CSV can be piped)."""
    import logging
    import sys

    import kernels
    from agent.ops.atomic import write_bytes_atomic

    # The summary below reports the reader's skip counts; its own log line would say it twice.
    logging.getLogger("agent.ingest.tables").setLevel(logging.ERROR)

    if out is not None and out.resolve() == Path(table).resolve():
        raise ConfigError(WHERE, "--out", f"{out}: is the input table; refusing to overwrite it")
    model, plan = load_scoring_model(model_dir)
    scores = score_table(model, plan, table, kernels.get_backend("auto"), id_column)
    text = scores_csv(scores)
    if out is None:
        sys.stdout.write(text)
    else:
        try:
            write_bytes_atomic(out, text.encode())
        except OSError as exc:
            raise ConfigError(WHERE, "--out", f"{out}: cannot be written "
                                              f"({exc.strerror or exc})") from None
    for line in summary(scores) + ([f"probabilities in {out}"] if out is not None else []):
        print(line, file=sys.stdout if out is not None else sys.stderr)
    return 0


# ------------------------------------------------------------------ one study, exported model

MODEL_FILE = "model.onnx"


def exported_model_path(model: Path) -> Path:
    """--model as a file, or a directory holding model.onnx (a site's <state_dir>/model/)."""
    model = Path(model)
    if model.is_dir():
        if (model / MODEL_FILE).is_file():
            return model / MODEL_FILE
        hint = (" (it holds model.json: export it with `fedsilo model export`)"
                if (model / "model.json").is_file() else "")
        raise ConfigError(WHERE, "--model", f"{model}: no {MODEL_FILE} in this directory{hint}")
    if not model.is_file():
        raise ConfigError(WHERE, "--model", f"{model}: no such file or directory")
    return model


def parse_clinical(text: str, features: Sequence[FeatureSpec]) -> dict[str, str]:
    """--clinical: `name=value,name=value` (every feature, empty for missing), or a CSV file
    with a header and one data row. Columns the model does not read are ignored in a file,
    refused inline (a typo would otherwise read as a missing value)."""
    path = Path(text)
    names = [f.name for f in features]
    if "=" not in text and path.is_file():
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                sample = fh.read(4096)
                fh.seek(0)
                delimiter = ";" if sample.count(";") > sample.count(",") else ","
                rows = list(csv.DictReader(fh, delimiter=delimiter))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(WHERE, "--clinical", f"{path}: cannot be read ({exc})") from None
        if len(rows) != 1:
            raise ConfigError(WHERE, "--clinical", f"{path}: has {len(rows)} data rows; give a "
                                                   f"file with the header and one row")
        row = {k.strip(): (v or "") for k, v in rows[0].items() if k is not None}
    else:
        row = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(WHERE, "--clinical", f"{part!r} is not name=value (or a CSV "
                                                       f"file that exists)")
            row[name.strip()] = value.strip()
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ConfigError(WHERE, "--clinical", f"the model reads no feature named "
                                                   f"{', '.join(unknown)} (it reads "
                                                   f"{', '.join(names)})")
    absent = [n for n in names if n not in row]
    if absent:
        raise ConfigError(WHERE, "--clinical", f"no value for {', '.join(absent)} (write "
                                               f"name= for a missing value)")
    return {n: row[n] for n in names}


def run_predict_study(model: Path, clinical: str, study: Path | None = None, *,
                      as_json: bool = False) -> int:
    """`fedsilo predict --clinical ROW [--study PATH]`: one patient scored with onnxruntime on
    the exported model, the image preprocessed by the site's own pipeline."""
    import json

    from agent.ingest.study import preprocess_study
    from agent.learn.onnx_runtime import load_exported, score

    path = exported_model_path(model)
    try:
        exported = load_exported(path)
    except DataError as exc:
        raise ConfigError(WHERE, "--model", str(exc)) from None
    row = parse_clinical(clinical, exported.features)
    images, study_note = None, None
    if exported.imaging is not None:
        if study is None:
            raise ConfigError(WHERE, "--study", f"{path}: this model also reads the patient's "
                                                f"{exported.imaging.modality} series; give its "
                                                f"folder with --study")
        done = preprocess_study(study, exported.imaging)
        images = done.image[None]
        img = exported.imaging
        study_note = (f"study: {done.summary['stored']} files stored, series on the "
                      f"{img.depth}x{img.size}x{img.size} grid")
    elif study is not None:
        raise ConfigError(WHERE, "--study", f"{path}: a {exported.card['model_kind']} model "
                                            f"reads no image; leave out --study")
    try:
        (p,) = score(exported, [row], images).tolist()
    except ValueError as exc:
        raise ConfigError(WHERE, "--clinical", str(exc)) from None
    card = exported.card
    if p != p:  # NaN: the graph could not score the row
        raise DataError(f"the model cannot score this row: {_unscorable(row, exported)}")
    if as_json:
        print(json.dumps({"probability": p, "target": exported.target,
                          "model_version": exported.version, "model_sha256": exported.sha256,
                          "federation": card["federation"], "model_kind": card["model_kind"],
                          "research_use_only": True}, sort_keys=True))
        return 0
    rounds = card.get("rounds_completed", card["rounds"])
    print(f"model: {card['model_kind']} of federation {card['federation']} after {rounds} "
          f"rounds, version {exported.version} (research use only)")
    if study_note:
        print(study_note)
    print(f"P({exported.target} = 1) = {p:.4f}")
    return 0


def _unscorable(row: dict[str, str], exported: Any) -> str:
    """Which cells the graph could not read (for the operator's message)."""
    from agent.ingest.tables import MISSING_TOKENS, category_value

    bad = []
    for f in exported.features:
        if f.type != "categorical":
            continue
        text = category_value(row[f.name])
        if text and text.casefold() not in {lv.casefold() for lv in f.levels} \
                and text.lower() not in MISSING_TOKENS:
            bad.append(f"{f.name}={text!r} is not one of {', '.join(f.levels)}")
    policy = exported.card.get("missing", "?")
    return "; ".join(bad) or (f"a value is missing and the plan's missing policy is "
                              f"{policy!r} (rows with missing values are not scored)")


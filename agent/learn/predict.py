"""Score a table with a saved model (`fedsilo predict`): P(outcome) per row, AUC when labelled.

Why a command: a hospital wants the federation's model applied to its own patients without
writing Python. The table is read exactly as training read it (`load_table`: same encoding,
same skip reasons), standardised with the model's federated mean and scale, then scored by the
same forward pass the sites evaluate with. Nothing here sends anything anywhere.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from agent.config import Plan, plan_from_dict
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

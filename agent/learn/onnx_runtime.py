"""An exported model (`agent.learn.onnx_export`) loaded into onnxruntime, with what its card says.

Why a module of its own: scoring at the site and `fedsilo predict --study` run the exported
file, not the project's forward pass, so what radiology gets is exactly what any other
hospital runtime would compute from the same file. The card tells the feature list (names,
types, levels) and the imaging grid, so the file is all a scorer needs; a file without a
readable card, or exported with the encoded interface, is refused with what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import FeatureSpec, ImagingSpec
from agent.errors import DataError
from agent.learn import onnx_io as ox


@dataclass(frozen=True, eq=False)
class ExportedModel:
    path: Path
    session: Any  # onnxruntime.InferenceSession
    card: dict[str, str]
    features: tuple[FeatureSpec, ...]
    imaging: ImagingSpec | None  # the grid the image input takes; None for table models
    sha256: str  # of the file: what a score is recorded against

    @property
    def version(self) -> str:
        """Short model version for people: the parameters' digest, as on the card."""
        return self.card["params_sha256"][:12]

    @property
    def target(self) -> str:
        return self.card["target"]


def load_exported(path: Path, *, threads: int = 1) -> ExportedModel:
    """Read, check and open an exported model; DataError names the file and the problem.

    One thread by default: a site scores one series at a time beside clinical work."""
    import onnxruntime as ort

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings from graph optimisation are not the operator's
    try:  # onnxruntime parses and checks the graph itself: no `onnx` import (~15 MiB)
        session = ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise DataError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    card = dict(session.get_modelmeta().custom_metadata_map)
    try:
        features, imaging = _card_inputs(card)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: the model card is incomplete or unreadable ({exc}); was it "
                        f"written by fedsilo model export?") from None
    if card.get("clinical_inputs") != ox.RAW:
        raise DataError(f"{path}: exported with clinical inputs "
                        f"{card.get('clinical_inputs')!r}; scoring needs {ox.RAW!r} (the "
                        f"default of fedsilo model export)")
    return ExportedModel(path=path, session=session, card=card, features=features,
                         imaging=imaging, sha256=hashlib.sha256(raw).hexdigest())


def _card_inputs(card: Mapping[str, str]) -> tuple[tuple[FeatureSpec, ...], ImagingSpec | None]:
    features = tuple(FeatureSpec(name=str(f["name"]), type=str(f["type"]),
                                 levels=tuple(str(v) for v in f["levels"]),
                                 unit=str(f.get("unit", "")))
                     for f in json.loads(card["features"]))
    if not features or not card["params_sha256"] or not card["target"]:
        raise ValueError("no features, parameter digest or target")
    imaging = None
    if "imaging" in card:
        img = json.loads(card["imaging"])
        imaging = ImagingSpec(modality=str(img["modality"]), depth=int(img["depth"]),
                              size=int(img["size"]), window_center=float(img["window_center"]),
                              window_width=float(img["window_width"]))
    return features, imaging


def score(model: ExportedModel, rows: Sequence[Mapping[str, Any]],
          images: np.ndarray | None = None) -> np.ndarray:
    """P(target) per row (NaN where the row cannot be scored: an undeclared level, or a value
    missing under the plan's "drop" policy). Imaging models need one image per row.

    ValueError names a row or feature that is unusable, or an image of the wrong shape."""
    feeds = ox.row_feeds(model.features, rows)
    if model.imaging is not None:
        shape = (len(rows), model.imaging.depth, model.imaging.size, model.imaging.size)
        if images is None or images.shape != shape:
            raise ValueError(f"this model needs images of shape {shape}, got "
                             f"{None if images is None else images.shape}")
        feeds[ox.INPUT_IMAGE] = np.ascontiguousarray(images, dtype=np.float32)
    elif images is not None:
        raise ValueError("this model reads no image")
    return model.session.run([ox.OUTPUT], feeds)[0]


def rows_from_encoded(features: Sequence[FeatureSpec], x: np.ndarray) -> list[dict[str, Any]]:
    """Encoded table rows (`agent.ingest.tables`) back to cells the exported graph reads: the
    encoding is one-to-one (a number; one declared level, or all zeros for missing), so the
    graph re-encodes them to exactly `x`."""
    rows: list[dict[str, Any]] = [{} for _ in range(x.shape[0])]
    pos = 0
    for f in features:
        if f.type != "categorical":
            for row, v in zip(rows, x[:, pos].tolist(), strict=True):
                row[f.name] = v
            pos += 1
            continue
        block = x[:, pos:pos + len(f.levels)]
        for row, hot in zip(rows, block, strict=True):
            (which,) = np.nonzero(hot)
            row[f.name] = f.levels[int(which[0])] if which.size == 1 else ""
        pos += len(f.levels)
    return rows

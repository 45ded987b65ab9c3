"""The saved model: `model.json` (layout, encoding, standardisation) + `model.f32` (parameters).

Documented in docs/formats.md. Plain JSON and raw little-endian float32 so any language can
read it and nothing executable is ever loaded (no pickle); the JSON records the parameter
file's SHA-256 so a truncated copy is detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import DataError, ProtocolError
from agent.learn.layout import Layout
from agent.ops.atomic import write_bytes_atomic, write_json_atomic

FORMAT = "fedsilo-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SavedModel:
    layout: Layout
    params: np.ndarray
    columns: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    plan: dict[str, Any]
    image_norm: np.ndarray | None = None  # imaging models: per-voxel mean then scale, float32


def save_model(directory: Path, model: SavedModel, extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    raw = model.params.astype("<f4").tobytes()
    write_bytes_atomic(directory / "model.f32", raw)
    norm: dict[str, Any] = {}
    if model.image_norm is not None and model.image_norm.size:
        raw_norm = model.image_norm.astype("<f4").tobytes()
        write_bytes_atomic(directory / "image_norm.f32", raw_norm)
        norm = {"image_norm_file": "image_norm.f32",
                "image_norm_sha256": hashlib.sha256(raw_norm).hexdigest()}
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": model.layout.to_dict(),
        "params_file": "model.f32",
        "params_sha256": hashlib.sha256(raw).hexdigest(),
        "columns": list(model.columns),
        "standardization": {"mean": model.mean.tolist(), "scale": model.scale.tolist()},
        "plan": model.plan,
        **norm,
        **(extra or {}),
    }
    write_json_atomic(directory / "model.json", doc)
    return directory / "model.json"


def _member(directory: Path, doc: dict[str, Any], field: str) -> Path:
    """The file `field` names, which must be a plain file name inside the model directory:
    a received or copied model.json must not make us read (or hash) a file elsewhere."""
    name = doc[field]
    where = f"{directory}/model.json: {field}"
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name \
            or any(sep in name for sep in {"/", "\\", os.sep, os.altsep or "/"}):
        raise DataError(f"{where} {str(name)[:80]!r} must be a plain file name inside the "
                        "model directory")
    path = directory / name
    if path.is_symlink():
        target = path.resolve()
        if target.parent != directory.resolve():
            raise DataError(f"{where} {name!r} is a symlink to {target}, outside the model "
                            "directory")
    return path


def load_model(directory: Path) -> SavedModel:
    directory = Path(directory)
    try:
        doc = json.loads((directory / "model.json").read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT \
                or doc.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{directory}/model.json: not a fedsilo model version 1")
        raw = _member(directory, doc, "params_file").read_bytes()
        if hashlib.sha256(raw).hexdigest() != doc["params_sha256"]:
            raise DataError(f"{directory}/model.f32: digest does not match model.json")
        layout = Layout.from_dict(doc["layout"])
        params = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if params.size != layout.size:
            raise DataError(f"{directory}/model.f32: {params.size} values, layout needs "
                            f"{layout.size}")
        image_norm = None
        if "image_norm_file" in doc:
            raw_norm = _member(directory, doc, "image_norm_file").read_bytes()
            if hashlib.sha256(raw_norm).hexdigest() != doc["image_norm_sha256"]:
                raise DataError(f"{directory}/image_norm.f32: digest does not match model.json")
            image_norm = np.frombuffer(raw_norm, dtype="<f4").astype(np.float32)
        return SavedModel(layout=layout, params=params, columns=tuple(doc["columns"]),
                          mean=np.asarray(doc["standardization"]["mean"], dtype=np.float64),
                          scale=np.asarray(doc["standardization"]["scale"], dtype=np.float64),
                          plan=doc["plan"], image_norm=image_norm)
    except (OSError, KeyError, TypeError, ValueError, ProtocolError) as exc:
        raise DataError(f"{directory}: cannot read model ({exc})") from None

"""The exported graph's interface: input and output names, and its feeds built from rows.

Apart from `agent.learn.onnx_export` (which needs the `onnx` package to build graphs) so that
scoring, at a site or in `fedsilo predict`, needs only onnxruntime: the `onnx` package costs
a process ~15 MiB it would keep for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.config import FeatureSpec
from agent.ingest.tables import category_value, numeric_value

INPUT_FEATURES = "features"  # clinical="encoded": float32 [N, n_columns]
INPUT_IMAGE = "image"  # cnn_fused: float32 [N, depth, size, size]
OUTPUT = "probability"  # float32 [N]
RAW, ENCODED = "raw", "encoded"  # the two clinical interfaces of onnx_export.to_onnx


def row_feeds(features: Sequence[FeatureSpec], rows: Sequence[Mapping[str, Any]]
              ) -> dict[str, np.ndarray]:
    """The RAW graph's clinical inputs for rows given as {feature: cell} (text as in a CSV, or
    numbers), each cell read as training reads it. Every feature must be present (an empty
    cell is a missing value); ValueError names the row and feature otherwise."""
    feeds: dict[str, np.ndarray] = {}
    for f in features:
        values = []
        for i, row in enumerate(rows):
            if f.name not in row:
                raise ValueError(f"row {i + 1}: no value for feature {f.name!r} (leave it empty "
                                 f"for a missing value)")
            cell = row[f.name]
            if f.type == "categorical":
                values.append(category_value(cell))
                continue
            try:
                values.append(numeric_value(cell))
            except ValueError as exc:
                raise ValueError(f"row {i + 1}: feature {f.name!r}: {exc} value {cell!r}"
                                 ) from None
        feeds[f.name] = np.array(values, dtype=object if f.type == "categorical"
                                 else np.float32).reshape(-1, 1)
    return feeds

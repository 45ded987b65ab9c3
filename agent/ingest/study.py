"""One study folder preprocessed to a model's grid, for scoring outside the site daemon.

Why through the real pipeline: `fedsilo predict --study` must see the image exactly as training
saw its images (de-identification, series checks, HU, window, resampling), so it runs the same
`IngestPipeline` over a throw-away state directory instead of a second reader. The temporary
directory (its pseudonym key included) is deleted afterwards; nothing of the study is kept.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ImagingSpec
from agent.errors import DataError


@dataclass(frozen=True, eq=False)
class StudyImage:
    image: np.ndarray  # float32 [depth, size, size], windowed 0..1
    summary: dict[str, Any]  # the ingest summary: stored, quarantined, invalid series


def preprocess_study(path: Path, imaging: ImagingSpec, *, kernel_backend: str = "auto"
                     ) -> StudyImage:
    """The one patient's image training would use (their latest complete series on the grid).

    DataError when the folder yields no usable series, or holds more than one patient."""
    from agent.ingest.pipeline import IngestPipeline

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="fedsilo-study-") as tmp:
        pipeline = IngestPipeline(Path(tmp), imaging, kernel_backend=kernel_backend,
                                  decode_workers=1, tree_workers=1)
        try:
            pipeline.ingest_tree(path)
            pipeline.complete_series(quiet_s=0.0)
            summary = pipeline.summary()
            found = pipeline.store.series_for_patients(imaging)
            if len(found) > 1:
                raise DataError(f"{path}: holds images of {len(found)} patients; give one "
                                f"patient's study")
            if not found:
                raise DataError(f"{path}: no usable {imaging.modality} series ("
                                f"{_why(summary)})")
            image = np.load(next(iter(found.values())), allow_pickle=False)
        finally:
            pipeline.close()
    return StudyImage(image=image, summary=summary)


def _why(summary: dict[str, Any]) -> str:
    parts = [f"{summary['stored']} files stored"]
    for key in ("quarantined", "skipped", "series_invalid"):
        if summary.get(key):
            parts.append(f"{key.replace('_', ' ')}: " + ", ".join(
                f"{k} {v}" for k, v in summary[key].items()))
    return "; ".join(parts)

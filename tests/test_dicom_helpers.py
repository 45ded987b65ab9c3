"""Builders shared by the DICOM ingest tests: series copied from pydicom's CT_small.dcm.

(No tests here; the module name only keeps it beside the tests that use it.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from agent.config import ImagingSpec

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
MR_SMALL = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
SPEC = ImagingSpec(modality="CT", depth=4, size=16)


def ct_template() -> Dataset:
    return pydicom.dcmread(CT_SMALL)


def write_series(directory: Path, n: int, *, patient_id: str = "PAT-1", dz: float = 5.0,
                 skip: Iterable[int] = (), study_uid: str | None = None,
                 series_uid: str | None = None, shuffle_instance_numbers: bool = False,
                 edit: Callable[[Dataset, int], None] | None = None) -> list[Path]:
    """`n` CT slices (minus `skip`) along z with fresh UIDs; pixel values differ per slice
    (the slice index is added) so the order shows in the preprocessed array."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    base = ct_template()
    skipped = set(skip)
    paths = []
    for k in range(n):
        if k in skipped:
            continue
        ds = copy.deepcopy(base)  # file_meta too: an edit may change the transfer syntax
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, _ = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(k * dz, 4)]
        ds.InstanceNumber = (n - k) if shuffle_instance_numbers else k + 1
        pixels = base.pixel_array.astype(np.int16) + np.int16(100 * k)
        ds.PixelData = pixels.tobytes()
        if edit is not None:
            edit(ds, k)
        path = directory / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def tree_bytes(root: Path) -> list[tuple[Path, bytes]]:
    """Every regular file under `root` with its bytes."""
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]

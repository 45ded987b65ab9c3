"""Synthetic non-contrast head CT series, written as real DICOM files, for the demo and tests.

Each patient's latent infarct core (`_core_ml` from `cohort.generate_cohort(imaging=True)`)
becomes a hypodense ellipsoid in a simple head phantom: skull, grey/white matter, ventricles.
Early ischaemic change on NCCT is subtle (a few HU below ~35 HU parenchyma), so the lesion is
drawn at 18 HU (10-20 HU below white and grey matter), under each scanner's noise.

Sites differ the way real scanners do: noise, calibration offset, slice thickness, vendor tags,
and one site sends RLE-compressed images (pydicom 3 encodes RLE Lossless natively). Everything
is synthetic: names say SYNTHETIC, ids are the cohort's `SYN-...` ids, UIDs are fresh.
Images are small (64 x 64, 40 mm of brain) so the demo stays quick on two cores.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

ROWS = 64
PIXEL_MM = 3.5  # 224 mm field of view
SLAB_MM = 40.0  # the imaged slab through the lesion-bearing hemispheres
LESION_HU = 18.0  # ~10-20 HU below normal parenchyma (white 28, grey 38)


@dataclass(frozen=True)
class Scanner:
    """What makes one hospital's CTs look different from another's."""

    manufacturer: str
    model: str
    noise_hu: float
    offset_hu: float
    slice_mm: float
    compressed: bool = False

    @property
    def n_slices(self) -> int:
        return int(round(SLAB_MM / self.slice_mm))


SCANNERS = (
    Scanner("SYNTHETIC-VENDOR-A", "Alpha 128", noise_hu=3.0, offset_hu=0.0, slice_mm=5.0),
    Scanner("SYNTHETIC-VENDOR-B", "Beta 64", noise_hu=4.5, offset_hu=4.0, slice_mm=2.5),
    Scanner("SYNTHETIC-VENDOR-C", "Gamma 16", noise_hu=6.0, offset_hu=-3.0, slice_mm=5.0,
            compressed=True),
)


def scanner_for_site(index: int) -> Scanner:
    return SCANNERS[index % len(SCANNERS)]


def head_phantom_hu(scanner: Scanner, core_ml: float, rng: np.random.Generator) -> np.ndarray:
    """HU volume [slices, rows, cols] of one head with a lesion of `core_ml` millilitres."""
    n = scanner.n_slices
    z = (np.arange(n) + 0.5) * scanner.slice_mm - SLAB_MM / 2  # mm, slab centred on z = 0
    y, x = (np.mgrid[0:ROWS, 0:ROWS] + 0.5) * PIXEL_MM - ROWS * PIXEL_MM / 2
    zz = z[:, None, None]
    r_head = np.sqrt((x / 80.0) ** 2 + (y / 95.0) ** 2)[None] * np.ones((n, 1, 1))
    hu = np.full((n, ROWS, ROWS), -1000.0)  # air
    hu[r_head < 1.0] = 1200.0  # skull
    brain = r_head < 0.92
    hu[brain] = 38.0  # grey matter
    hu[(r_head < 0.75) & brain] = 28.0  # white matter
    ventricles = (np.abs(x) < 12)[None] & (np.abs(y) < 30)[None] & (np.abs(zz) < 15)
    hu[ventricles & brain] = 6.0
    if core_ml > 0:
        # An ellipsoid (1.1 r in-plane, 0.8 r through-plane) of the core's volume, inside one
        # hemisphere; infarcted tissue takes a density of LESION_HU whatever it was before.
        radius = (3.0 * core_ml * 1000.0 / (4.0 * math.pi * 0.968)) ** (1.0 / 3.0)  # mm
        side = rng.choice([-1.0, 1.0])
        cx, cy, cz = side * rng.uniform(20, 40), rng.uniform(-25, 25), rng.uniform(-5, 5)
        inside = (((x[None] - cx) / (1.1 * radius)) ** 2 + ((y[None] - cy) / (1.1 * radius)) ** 2
                  + ((zz - cz) / (0.8 * radius)) ** 2) < 1.0
        hu[inside & brain & ~ventricles] = LESION_HU
    hu += scanner.offset_hu + rng.normal(0.0, scanner.noise_hu, hu.shape)
    return hu


def _template(scanner: Scanner, patient_id: str, study_uid: str, series_uid: str,
              study_date: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = study_date
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "NCCT HEAD (SYNTHETIC)"
    ds.BodyPartExamined = "HEAD"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model
    ds.KVP = 120
    ds.SliceThickness = scanner.slice_mm
    ds.SpacingBetweenSlices = scanner.slice_mm
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = ROWS
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    return ds


def write_series(directory: Path, patient_id: str, hu: np.ndarray, scanner: Scanner, *,
                 study_date: dt.date | None = None) -> list[Path]:
    """Write one CT series (one file per slice) into `directory`; returns the file paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
    template = _template(scanner, patient_id, generate_uid(), generate_uid(),
                         (study_date or dt.date(2026, 1, 15)).strftime("%Y%m%d"))
    template.Rows, template.Columns = stored.shape[1], stored.shape[2]
    paths = []
    for k in range(stored.shape[0]):
        ds = template.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        z = (k + 0.5) * scanner.slice_mm - SLAB_MM / 2
        ds.ImagePositionPatient = [-ROWS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2, round(z, 3)]
        ds.SliceLocation = round(z, 3)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.PixelData = stored[k].tobytes()
        if scanner.compressed:
            ds.compress(RLELossless, stored[k])
        path = directory / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_site_studies(root: Path, patient_ids: np.ndarray, core_ml: np.ndarray,
                       scanner: Scanner, rng: np.random.Generator, *,
                       progress: bool = False) -> int:
    """One NCCT series per patient under `root/<n>/`; returns the number of files written.

    Folder names are running numbers, never patient ids (a PACS export would not leak them in
    paths either)."""
    files = 0
    for i, (pid, core) in enumerate(zip(patient_ids, core_ml, strict=True)):
        files += len(write_series(root / f"{i:05d}", str(pid),
                                  head_phantom_hu(scanner, float(core), rng), scanner))
        if progress and (i + 1) % 100 == 0:
            print(f"\r    {i + 1}/{len(patient_ids)} studies", end="", flush=True)
    if progress:
        print(f"\r    {len(patient_ids)}/{len(patient_ids)} studies", flush=True)
    return files

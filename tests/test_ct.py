"""The synthetic CT generator writes real, readable DICOM with the intended per-site quirks."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from agent.demo import cohort, ct


@pytest.mark.parametrize("scanner", ct.SCANNERS)
def test_series_is_real_dicom_with_geometry_and_scanner_quirks(tmp_path, scanner):
    rng = np.random.default_rng(3)
    hu = ct.head_phantom_hu(scanner, 30.0, rng)
    paths = ct.write_series(tmp_path, "SYN-a-000001", hu, scanner)
    assert len(paths) == scanner.n_slices == hu.shape[0]
    slices = [pydicom.dcmread(p) for p in paths]
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    assert np.allclose(np.diff(z), scanner.slice_mm)
    assert len({s.SOPInstanceUID for s in slices}) == len(slices)
    assert len({s.SeriesInstanceUID for s in slices}) == 1
    first = slices[0]
    assert first.Modality == "CT" and first.Manufacturer == scanner.manufacturer
    assert (first.file_meta.TransferSyntaxUID == RLELossless) == scanner.compressed
    decoded = np.stack([s.pixel_array for s in slices]).astype(np.float64)
    hu_back = decoded * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.allclose(hu_back, np.clip(np.round(hu + 1024), 0, 4095) - 1024)


def test_lesion_lowers_parenchyma_hu_in_proportion_to_volume():
    scanner = ct.SCANNERS[0]
    means = []
    for core in (0.0, 20.0, 80.0):
        hu = ct.head_phantom_hu(scanner, core, np.random.default_rng(1))
        parenchyma = (hu > 10) & (hu < 60)
        means.append(hu[parenchyma].mean())
    assert means[0] > means[1] > means[2]


def test_core_volume_drives_outcome_only_when_imaging_is_simulated():
    profile = cohort.default_profiles(1, 0)[0]
    plain = cohort.generate_cohort(profile, np.random.default_rng(5))
    plain_again = cohort.generate_cohort(profile, np.random.default_rng(5), imaging=False)
    for key in plain:  # table-only cohorts are unchanged by the imaging option
        assert np.array_equal(plain[key], plain_again[key])
    img = cohort.generate_cohort(profile, np.random.default_rng(5), imaging=True,
                                 include_latent=True)
    core, good = img["_core_ml"], img[cohort.DEMO_TARGET]
    assert good[core < 10].mean() > good[core > 50].mean() + 0.25
    assert "_core_ml" not in cohort.TABLE_COLUMNS

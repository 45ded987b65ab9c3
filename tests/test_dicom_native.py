"""The native reader must give exactly what pydicom gives, or step aside.

For every file it accepts, the pipeline's reading of it (pseudonyms, checked header, decoded
frames, or the rejection) must equal the reading of the same file through pydicom; on
anything it does not fully understand it returns None and the pydicom path decides."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.demo import ct
from agent.ingest import dicom_native, reader
from agent.ingest.deid import quiet_pydicom
from agent.ingest.dicom_read import read_dataset
from agent.ingest.quarantine import Rejected
from tests.test_dicom_helpers import CT_SMALL, MR_SMALL, ct_template

SECRET = b"s" * 32


def _reading(ds: object, path: Path) -> tuple[str, object]:
    try:
        image = reader._read(ds, path, SECRET, lambda sop: False, None)
    except Rejected as exc:
        return "rejected", (exc.status, exc.reason)
    frames = None if image.frames is None else (image.frames.dtype.str, image.frames.tobytes())
    return "image", (image.ids, image.header, frames)


def _agrees(path: Path) -> bool:
    """True when the native reader made an image of the file; fails the test if that
    image differs from pydicom's reading."""
    with quiet_pydicom():
        native = dicom_native.read_native(path)
        if native is None:
            return False
        fast = _reading(native, path)
        if fast[0] == "rejected":
            return False  # read_image asks pydicom then: nothing to compare
        try:
            slow = _reading(read_dataset(path), path)
        except Rejected as exc:
            slow = ("rejected", (exc.status, exc.reason))
    assert fast == slow, path.name
    return True


def test_every_pydicom_test_file_reads_the_same_or_goes_to_pydicom():
    files = [Path(f) for f in pydicom.data.get_testdata_files()]
    accepted = {f.name for f in files if f.is_file() and _agrees(f)}
    # The plain native CT/MR slices pydicom ships are read natively.
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"} <= accepted
    # Compressed, big-endian, deflated and enhanced multi-frame files are not.
    assert not accepted & {"MR_small_RLE.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                           "MR_small_jp2klossless.dcm", "emri_small_jpeg_2k_lossless.dcm"}


def test_demo_ct_slices_are_read_natively(tmp_path):
    scanner = ct.Scanner("T", "Test", noise_hu=5.0, offset_hu=0.0, slice_mm=2.0)
    hu = np.random.default_rng(1).normal(30.0, 20.0, (3, 32, 32))
    for path in ct.write_series(tmp_path, "PAT-9", hu, scanner):
        assert _agrees(path)


def _variant(tmp_path: Path, name: str, syntax: str, undefined: bool) -> Path:
    """A CT slice with nested sequences, in either VR encoding, sequence lengths defined or
    not (what scanners write varies)."""
    ds = copy.deepcopy(ct_template())
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "T-A0100", "SRT"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, copy.deepcopy(item)])
    ds.AnatomicRegionSequence = Sequence([])
    for keyword in ("ReferencedImageSequence", "AnatomicRegionSequence"):
        ds[keyword].is_undefined_length = undefined
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = undefined
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [True, False])
def test_sequences_are_walked_in_both_encodings(tmp_path, syntax, undefined):
    assert _agrees(_variant(tmp_path, "seq.dcm", syntax, undefined))


def test_truncated_copies_read_the_same_or_go_to_pydicom(tmp_path):
    data = _variant(tmp_path, "full.dcm", ExplicitVRLittleEndian, True).read_bytes()
    cut = tmp_path / "cut.dcm"
    accepted = 0
    for end in [*range(0, 1200, 3), *range(1200, len(data), 997), len(data) - 1]:
        cut.write_bytes(data[:end])
        accepted += _agrees(cut)
    # Cut before the pixel data ends, a file is never taken for a whole one.
    assert accepted == 0


def test_mutated_headers_read_the_same_or_go_to_pydicom(tmp_path):
    base = bytearray(_variant(tmp_path, "full.dcm", ImplicitVRLittleEndian, True).read_bytes())
    header_end = base.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010): the pixel data starts
    rng = np.random.default_rng(7)
    bad = tmp_path / "bad.dcm"
    accepted = 0
    for _ in range(300):
        data = bytearray(base)
        for at in rng.integers(132, header_end, size=int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(data))
        accepted += _agrees(bad)
    assert accepted > 0  # flips inside values leave a readable file: those are compared too


def test_values_that_are_not_plain_go_to_pydicom(tmp_path):
    def saved(change) -> Path:
        ds = copy.deepcopy(ct_template())
        change(ds)
        path = tmp_path / "v.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    assert dicom_native.read_native(saved(lambda ds: None)) is not None
    for change in (
        lambda ds: setattr(ds, "PatientID", "MÜLLER"),  # not ASCII: character sets
        lambda ds: setattr(ds, "PatientID", "A\\B"),  # two values
        lambda ds: ds.add_new((0x5200, 0x9229), "SQ", Sequence([])),  # functional groups
    ):
        with quiet_pydicom():
            assert dicom_native.read_native(saved(change)) is None
    # A decimal that is not a number (pydicom refuses to write one: patch the bytes).
    path = saved(lambda ds: setattr(ds, "ImagePositionPatient", [1.5, 2.5, 3.5]))
    data = path.read_bytes()
    assert data.count(b"1.5\\2.5\\3.5") == 1
    path.write_bytes(data.replace(b"1.5\\2.5\\3.5", b"1.5\\2.x\\3.5"))
    with quiet_pydicom():
        assert dicom_native.read_native(path) is None


def test_pixel_values_within_stored_bits_are_not_copied(tmp_path):
    ds = copy.deepcopy(ct_template())
    values = np.random.default_rng(3).integers(0, 4096, (ds.Rows, ds.Columns), dtype=np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = values.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    assert _agrees(tmp_path / "x.dcm")
    image = reader.read_image(tmp_path / "x.dcm", SECRET)
    assert np.array_equal(image.frames[0], values)


def test_mr_and_ct_from_pydicom_are_native():
    for path in (CT_SMALL, MR_SMALL):
        assert dicom_native.read_native(path) is not None

"""Reading DICOM files defensively: caps first, then pydicom, then typed header values.

Order matters for a hospital-facing agent. Before pydicom parses a byte we check the file size
(and, for Deflated data sets, the inflated size by streaming through zlib), because pydicom
inflates a deflated data set in one go. Before any pixel data is decoded we check what the
header *declares* (rows, columns, frames, bits, samples) against the caps below, because a
decoder allocates the declared output size up front. Everything that goes wrong becomes a
`Rejected` with a reason code; nothing here logs or raises a DICOM value.

Only CT and MR images are stored (`IMAGE_SOP_CLASSES`); other objects are skipped. A
multi-frame image becomes one slice per frame, placed by its per-frame functional groups where
present, else by the top-level position stepped along the slice normal.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble

from agent.ingest.deid import kept
from agent.ingest.quarantine import (
    BURNED_IN_ANNOTATION,
    DICOMDIR,
    EMPTY,
    INVALID_ATTRIBUTE,
    MISSING_ATTRIBUTE,
    NOT_A_FILE,
    NOT_CT_MR,
    NOT_DICOM,
    READ_FAILED,
    TOO_LARGE,
    TRUNCATED,
    UNSUPPORTED_PIXEL_FORMAT,
    UNSUPPORTED_TRANSFER_SYNTAX,
    Rejected,
    skip,
    with_keyword,
)

MAX_ROWS = 4096
MAX_COLUMNS = 4096
MAX_FRAMES = 2000
MAX_PIXEL_BYTES = 1 << 30  # decoded pixel data of one file
MAX_FILE_BYTES = MAX_PIXEL_BYTES + (64 << 20)  # a file (or an inflated data set) on disk

IMAGE_SOP_CLASSES = {
    dicom_uid.CTImageStorage: "CT",
    dicom_uid.EnhancedCTImageStorage: "CT",
    dicom_uid.LegacyConvertedEnhancedCTImageStorage: "CT",
    dicom_uid.MRImageStorage: "MR",
    dicom_uid.EnhancedMRImageStorage: "MR",
    dicom_uid.LegacyConvertedEnhancedMRImageStorage: "MR",
}
NATIVE_SYNTAXES = (dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRLittleEndian,
                   dicom_uid.ExplicitVRBigEndian, dicom_uid.DeflatedExplicitVRLittleEndian)


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame sits and how its stored values become physical units."""

    position: tuple[float, float, float]  # ImagePositionPatient, mm
    orientation: tuple[float, float, float, float, float, float]  # row then column cosines
    pixel_spacing: tuple[float, float]  # mm between rows, between columns
    slope: float
    intercept: float


@dataclass(frozen=True)
class ImageHeader:
    """The whitelisted, typed header of one CT/MR image object."""

    modality: str  # "CT" | "MR", from the SOP class
    rows: int
    columns: int
    frames: int
    bits_allocated: int
    transfer_syntax: str
    compressed: bool  # encapsulated pixel data: decode in the worker process
    geometry: tuple[FrameGeometry, ...]


# ---------------------------------------------------------------------------- file level


def read_dataset(path: Path) -> pydicom.Dataset:
    """Parse a file into a pydicom data set, or raise `Rejected` with why not."""
    try:
        st = os.stat(path)
    except OSError:
        raise skip(NOT_A_FILE) from None
    if not stat.S_ISREG(st.st_mode):
        raise skip(NOT_A_FILE)
    if st.st_size == 0:
        raise Rejected(EMPTY)
    if st.st_size > MAX_FILE_BYTES:
        raise Rejected(TOO_LARGE)
    with open(path, "rb") as fh:
        head = fh.read(132)
        has_preamble = len(head) == 132 and head[128:] == b"DICM"
        if not has_preamble and not _plausible_raw_dataset(head):
            raise Rejected(NOT_DICOM)
        if has_preamble:
            fh.seek(0)
            _check_inflated_size(fh)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not has_preamble)
    except InvalidDicomError:
        raise Rejected(NOT_DICOM) from None
    except (EOFError, struct.error, zlib.error):
        raise Rejected(TRUNCATED) from None
    except MemoryError:
        raise Rejected(TOO_LARGE) from None
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on malformed input
        raise Rejected(READ_FAILED) from None
    if len(ds) == 0:  # nothing past the file meta: a cut-off file, or not DICOM at all
        raise Rejected(TRUNCATED if has_preamble else NOT_DICOM)
    # pydicom reads a file cut short leniently: a value shorter than its declared length, or a
    # sequence without its end delimiter ("End of file reached ..."), only warns.
    if _last_value_short(ds) or any("end of file" in str(w.message).lower() for w in caught):
        raise Rejected(TRUNCATED)
    return ds


def _last_value_short(ds: pydicom.Dataset) -> bool:
    """Whether the data set's last element holds fewer bytes than its header declared."""
    tags = list(ds.keys())
    if not tags:
        return False
    raw = ds.get_item(tags[-1])
    length, value = getattr(raw, "length", None), getattr(raw, "value", None)
    return (isinstance(length, int) and length != 0xFFFFFFFF
            and isinstance(value, bytes) and len(value) < length)


def _plausible_raw_dataset(head: bytes) -> bool:
    """A Part 10 file without preamble: starts with a group 0002 or 0008 tag (either byte
    order). Anything else is not worth handing to pydicom with `force=True`."""
    if len(head) < 8:
        return False
    little, big = head[0] | head[1] << 8, head[0] << 8 | head[1]
    return little in (0x0002, 0x0008) or big == 0x0008


_DEFLATED = str(dicom_uid.DeflatedExplicitVRLittleEndian).encode()


def _surely_not_deflated(fh: Any) -> bool:
    """True when the file meta group, read as raw bytes, cannot name the Deflated syntax:
    it starts with a well-formed (0002,0000) group length and that many bytes do not hold
    the UID. Anything unusual returns False, and pydicom reads the meta properly."""
    fh.seek(132)
    head = fh.read(12)
    if len(head) != 12 or head[:8] != b"\x02\x00\x00\x00UL\x04\x00":
        return False
    length = struct.unpack("<I", head[8:])[0]
    if length > (1 << 20):
        return False
    meta = fh.read(length)
    return len(meta) == length and _DEFLATED not in meta


def _check_inflated_size(fh: Any) -> None:
    """For Deflated Explicit VR files, count the inflated bytes (without keeping them)."""
    if _surely_not_deflated(fh):
        return
    fh.seek(0)
    try:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        ts = meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - let the full read classify a broken meta group
        return
    if ts != dicom_uid.DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := fh.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 24))
                if total > MAX_FILE_BYTES:
                    raise Rejected(TOO_LARGE)
                chunk = inflater.unconsumed_tail
    except zlib.error:
        raise Rejected(TRUNCATED) from None


def transfer_syntax(ds: pydicom.Dataset) -> dicom_uid.UID:
    """The data set's transfer syntax; for a file without meta, the one it was read with
    (recorded in file_meta, which pixel decoding needs)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if isinstance(ts, dicom_uid.UID):
        return ts
    if ts:
        return dicom_uid.UID(str(ts))
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ts = (dicom_uid.ImplicitVRLittleEndian if implicit else
          dicom_uid.ExplicitVRLittleEndian if little else dicom_uid.ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def classify(ds: pydicom.Dataset) -> str:
    """"CT" or "MR" for an image we store; otherwise a skip (or a quarantine if unusable)."""
    if is_dicomdir(ds):
        raise skip(DICOMDIR)
    sop = kept(ds, "SOPClassUID")
    if not sop:
        raise Rejected(with_keyword(MISSING_ATTRIBUTE, "SOPClassUID"))
    sop = str(sop).strip()
    if sop not in IMAGE_SOP_CLASSES:
        keyword = dicom_uid.UID(sop).keyword
        raise skip(with_keyword(NOT_CT_MR, keyword if keyword.isalnum() else "unknown"))
    burned = kept(ds, "BurnedInAnnotation")
    if isinstance(burned, str) and burned.strip().upper() == "YES":
        raise skip(BURNED_IN_ANNOTATION)
    return IMAGE_SOP_CLASSES[sop]


# ---------------------------------------------------------------------------- header


def _int(ds: Any, keyword: str, default: int | None = None) -> int:
    value = kept(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise Rejected(with_keyword(MISSING_ATTRIBUTE, keyword))
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword)) from None
    if not math.isfinite(number) or number != int(number):
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword))
    return int(number)


def _floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    """n finite floats, or None when absent."""
    value = kept(ds, keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) \
        else [value]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword)) from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword))
    return out


def check_pixel_format(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    """(frames, rows, columns, bits allocated) after checking the declared size against the
    caps and the format against what CT/MR preprocessing handles. Nothing is decoded."""
    if kept(ds, "PixelData") is None:
        raise Rejected(with_keyword(MISSING_ATTRIBUTE, "PixelData"))
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1)
    if rows < 1 or columns < 1 or frames < 1:
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, "Rows" if rows < 1 else
                                    "Columns" if columns < 1 else "NumberOfFrames"))
    if rows > MAX_ROWS or columns > MAX_COLUMNS or frames > MAX_FRAMES:
        raise Rejected(TOO_LARGE)
    bits = _int(ds, "BitsAllocated")
    samples = _int(ds, "SamplesPerPixel", 1)
    if rows * columns * frames * samples * max(bits, 8) // 8 > MAX_PIXEL_BYTES:
        raise Rejected(TOO_LARGE)
    photometric = kept(ds, "PhotometricInterpretation")
    if samples != 1 or bits not in (8, 16, 32) or not isinstance(photometric, str) \
            or photometric.strip() not in ("MONOCHROME1", "MONOCHROME2"):
        raise Rejected(UNSUPPORTED_PIXEL_FORMAT)
    stored = _int(ds, "BitsStored", bits)
    representation = _int(ds, "PixelRepresentation", 0)
    if not 1 <= stored <= bits or representation not in (0, 1):
        raise Rejected(UNSUPPORTED_PIXEL_FORMAT)
    return frames, rows, columns, bits


def parse_header(ds: pydicom.Dataset, modality: str) -> ImageHeader:
    """Typed header of a CT/MR image, checked before any pixel data is decoded."""
    frames, rows, columns, bits = check_pixel_format(ds)
    ts = transfer_syntax(ds)
    compressed = ts not in NATIVE_SYNTAXES
    if compressed:
        _check_decoder(ts)
    else:
        data = kept(ds, "PixelData")
        if not isinstance(data, (bytes, memoryview)):  # memoryview: dicom_native
            raise Rejected(with_keyword(INVALID_ATTRIBUTE, "PixelData"))
        if len(data) < rows * columns * frames * bits // 8:
            raise Rejected(TRUNCATED)
    return ImageHeader(modality=modality, rows=rows, columns=columns, frames=frames,
                       bits_allocated=bits, transfer_syntax=str(ts), compressed=compressed,
                       geometry=frame_geometry(ds, frames))


def _check_decoder(ts: dicom_uid.UID) -> None:
    try:
        if not ts.is_transfer_syntax or not ts.is_encapsulated:
            raise Rejected(UNSUPPORTED_TRANSFER_SYNTAX)
        if not pydicom.pixels.get_decoder(ts).is_available:
            raise Rejected(UNSUPPORTED_TRANSFER_SYNTAX)
    except (NotImplementedError, ValueError):
        raise Rejected(UNSUPPORTED_TRANSFER_SYNTAX) from None


# ---------------------------------------------------------------------------- geometry


def _first_item(ds: Any, keyword: str) -> Any:
    seq = kept(ds, keyword)
    if seq is None:
        return None
    try:
        return seq[0] if len(seq) else None
    except (TypeError, IndexError):
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword)) from None


def _lookup(groups: list[Any], top: Any, sequence: str, keyword: str,
            n: int) -> tuple[float, ...] | None:
    """The first value of `keyword` inside `sequence` of the functional group items (per-frame
    before shared), else at the top level of the data set (`top`, None to not look there)."""
    for group in groups:
        holder = _first_item(group, sequence)
        if holder is not None:
            value = _floats(holder, keyword, n)
            if value is not None:
                return value
    return None if top is None else _floats(top, keyword, n)


def _unit_orientation(orientation: tuple[float, ...]) -> tuple[float, ...]:
    row, col = orientation[:3], orientation[3:]
    nr, nc = math.hypot(*row), math.hypot(*col)
    dot = sum(r * c for r, c in zip(row, col, strict=True))
    if not (0.9 < nr < 1.1 and 0.9 < nc < 1.1) or abs(dot) > 0.05 * nr * nc:
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, "ImageOrientationPatient"))
    return tuple(v / nr for v in row) + tuple(v / nc for v in col)


def frame_geometry(ds: pydicom.Dataset, frames: int) -> tuple[FrameGeometry, ...]:
    """One geometry per frame, from the functional groups, the top level, or stepped."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = kept(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) not in (0, frames):
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, "PerFrameFunctionalGroupsSequence"))
    out: list[tuple[Any, ...]] = []
    for f in range(frames):
        groups = ([per_frame[f]] if per_frame else []) + ([shared] if shared else [])
        # A frame's own position, else (first frame only) the shared or top-level one.
        position = _lookup(groups if f == 0 or not per_frame else groups[:1],
                           ds if f == 0 else None,
                           "PlanePositionSequence", "ImagePositionPatient", 3)
        orientation = _lookup(groups, ds, "PlaneOrientationSequence",
                              "ImageOrientationPatient", 6)
        spacing = _lookup(groups, ds, "PixelMeasuresSequence", "PixelSpacing", 2)
        slope = _lookup(groups, ds, "PixelValueTransformationSequence", "RescaleSlope", 1)
        intercept = _lookup(groups, ds, "PixelValueTransformationSequence",
                            "RescaleIntercept", 1)
        if orientation is None:
            raise Rejected(with_keyword(MISSING_ATTRIBUTE, "ImageOrientationPatient"))
        if spacing is None:
            raise Rejected(with_keyword(MISSING_ATTRIBUTE, "PixelSpacing"))
        if spacing[0] <= 0 or spacing[1] <= 0:
            raise Rejected(with_keyword(INVALID_ATTRIBUTE, "PixelSpacing"))
        if slope is not None and slope[0] == 0:
            raise Rejected(with_keyword(INVALID_ATTRIBUTE, "RescaleSlope"))
        out.append((position, _unit_orientation(orientation), spacing,
                    1.0 if slope is None else slope[0],
                    0.0 if intercept is None else intercept[0]))
    return tuple(FrameGeometry(position=p, orientation=o, pixel_spacing=s, slope=m, intercept=b)
                 for p, o, s, m, b in _fill_positions(ds, out))


def _fill_positions(ds: Any, frames: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Frames without their own position (a legacy multi-frame image) are stepped from the
    first frame's position along the slice normal by SpacingBetweenSlices (else
    SliceThickness)."""
    if frames[0][0] is None:
        raise Rejected(with_keyword(MISSING_ATTRIBUTE, "ImagePositionPatient"))
    missing = [f for f in frames if f[0] is None]
    if not missing:
        return frames
    if len(missing) != len(frames) - 1:
        raise Rejected(with_keyword(MISSING_ATTRIBUTE, "PlanePositionSequence"))
    step = _floats(ds, "SpacingBetweenSlices", 1) or _floats(ds, "SliceThickness", 1)
    if step is None or step[0] <= 0:
        raise Rejected(with_keyword(MISSING_ATTRIBUTE, "SpacingBetweenSlices"))
    o = np.asarray(frames[0][1])
    normal = np.cross(o[:3], o[3:])
    base = np.asarray(frames[0][0])
    return [(tuple(float(v) for v in base + i * step[0] * normal), *rest)
            for i, (_, *rest) in enumerate(frames)]


# ---------------------------------------------------------------------------- DICOMDIR


def is_dicomdir(ds: pydicom.Dataset) -> bool:
    """A media directory by content (its name may be anything): the Media Storage
    Directory SOP class, or a directory record sequence."""
    meta = getattr(ds, "file_meta", None)
    media = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return media == dicom_uid.MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


@dataclass(frozen=True)
class DicomdirListing:
    files: list[Path]  # listed files that exist beside it, each once
    records: int  # records that reference a file
    outside: int  # references leaving its folder: not followed
    missing: int  # references to files that are not there


def dicomdir_files(path: Path) -> DicomdirListing | None:
    """What the DICOMDIR at `path` lists, or None when the file is not a DICOMDIR (by
    content). References leaving its folder are not followed."""
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    if not is_dicomdir(ds):
        return None
    root = path.parent.resolve()
    out: list[Path] = []
    records = outside = missing = 0
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if not ref:
            continue
        records += 1
        parts = [str(p) for p in (ref if isinstance(ref, (list, pydicom.multival.MultiValue))
                                  else [ref])]
        target = root.joinpath(*parts).resolve()
        if not target.is_relative_to(root):
            outside += 1
        elif not target.is_file():
            missing += 1
        elif target not in out:
            out.append(target)
    return DicomdirListing(out, records, outside, missing)

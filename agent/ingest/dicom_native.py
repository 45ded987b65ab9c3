"""A fast reader for the common case: a plain, well-formed, uncompressed little-endian file.

Most of what a scanner or PACS sends is one CT/MR slice in Explicit (or Implicit) VR Little
Endian. For those, pydicom's general parser costs more than everything else the pipeline does
with the file (it builds an element object for every attribute; we need twenty). Here a compiled
walker checks the structure of the whole file — every element header, every nested sequence and
item to its delimiter, tags ascending, no value running past the end — and notes where the
whitelisted attributes are; only those are converted, to exactly the values pydicom gives.

The reader is deliberately narrow. Anything it does not fully understand — no preamble, another
transfer syntax, encapsulated or big-endian pixel data, a functional-group or directory
sequence, a VR other than the dictionary's, a value that does not convert cleanly, non-ASCII
text in an identifier, any structural doubt — returns None, and the caller reads the file with
pydicom (`dicom_read.read_dataset`), which gives the canonical outcome and reason. So this
module never rejects a file; it only recognises simple ones. Tests check it against pydicom on
every file pydicom ships and on cut and altered copies.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit
from pydicom import uid as dicom_uid
from pydicom.datadict import tag_for_keyword

from agent.ingest.deid import HASHED, WHITELIST

# Tags the walker reports at the top level, with the VRs we accept for each (explicit VR).
_VR_OF = {
    "US": ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
           "PixelRepresentation"),
    "IS": ("NumberOfFrames",),
    "DS": ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
           "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept"),
    "CS": ("PhotometricInterpretation", "BurnedInAnnotation"),
    "UI": ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
    "LO": ("PatientID",),
    "PX": ("PixelData",),  # OB or OW
}
# Their presence sends the file to pydicom (multi-frame geometry, a DICOMDIR).
_OTHER = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
          "DirectoryRecordSequence")
_KEYWORDS = tuple(sorted([k for ks in _VR_OF.values() for k in ks] + list(_OTHER),
                         key=tag_for_keyword))
_TAGS = np.array([tag_for_keyword(k) for k in _KEYWORDS], dtype=np.int64)
_INDEX = {k: i for i, k in enumerate(_KEYWORDS)}
_EXPECTED_VR = {k: vr for vr, ks in _VR_OF.items() for k in ks}
assert all(k in WHITELIST or k in HASHED for k in _EXPECTED_VR)  # nothing else is read

_META_KEYWORDS = ("MediaStorageSOPClassUID", "TransferSyntaxUID")
_META_TAGS = np.array([tag_for_keyword(k) for k in _META_KEYWORDS], dtype=np.int64)

_SYNTAXES = {dicom_uid.ImplicitVRLittleEndian: False, dicom_uid.ExplicitVRLittleEndian: True}
_SYNTAX_UIDS = {str(u): u for u in _SYNTAXES}
MAX_BYTES = 64 << 20  # larger files (big multi-frame objects) take the general path
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32


# ---------------------------------------------------------------------------- the walker


@njit(cache=True)
def _u16(b, p):  # pragma: no cover - compiled
    return np.int64(b[p]) | (np.int64(b[p + 1]) << 8)


@njit(cache=True)
def _u32(b, p):  # pragma: no cover - compiled
    return _u16(b, p) | (_u16(b, p + 2) << 16)


def _vr_code(name: str) -> int:
    return ord(name[0]) << 8 | ord(name[1])


# Explicit VR header forms by VR code: 0 not a VR (the file goes to pydicom), 1 a 2-byte
# length, 2 a reserved field and a 4-byte length (PS3.5 7.1.2).
_VR_FORM = np.zeros(1 << 16, dtype=np.uint8)
for _vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH",
            "SL", "SS", "ST", "TM", "UI", "UL", "US"):
    _VR_FORM[_vr_code(_vr)] = 1
for _vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
    _VR_FORM[_vr_code(_vr)] = 2
_SQ = _vr_code("SQ")


@njit(cache=True, boundscheck=True)  # hostile input: an index bug raises, never reads
def _scan(buf, pos, explicit, meta_only, wanted, offsets, lengths, vrs,
          vr_form):  # pragma: no cover - compiled
    """Walk the data set in buf[pos:] and fill offsets/lengths/vrs for the `wanted` tags
    (sorted) found at the top level (-1 where absent). Returns where the walk ended (the end
    of the buffer; with `meta_only`, the first element outside group 0002), or a negative
    code: -1 runs past the end, -2 bad delimiter or item, -3 top-level tags not ascending,
    -4 nested too deep, -5 an undefined length where only a sequence may have one, -6 an
    explicit VR that is not one."""
    n = buf.shape[0]
    offsets[:] = -1
    lengths[:] = -1
    vrs[:] = 0
    kinds = np.zeros(_MAX_DEPTH, dtype=np.int64)  # 0: elements (data set or item), 1: items
    ends = np.full(_MAX_DEPTH, -1, dtype=np.int64)  # -1: undefined length, ends at delimiter
    ends[0] = n
    depth = 0
    last_tag = -1
    w = 0
    while True:
        end = ends[depth]
        if end >= 0 and pos >= end:
            if pos > end:
                return -1
            if depth == 0:
                return pos
            depth -= 1
            continue
        if pos + 8 > n:
            return -1
        group = _u16(buf, pos)
        element = _u16(buf, pos + 2)
        tag = (group << 16) | element
        if kinds[depth] == 1:  # a sequence: items and its delimiter
            length = _u32(buf, pos + 4)
            pos += 8
            if tag == 0xFFFEE0DD:
                if end >= 0 or length != 0:
                    return -2
                depth -= 1
            elif tag == 0xFFFEE000:
                if depth + 1 >= _MAX_DEPTH:
                    return -4
                depth += 1
                kinds[depth] = 0
                if length == _UNDEFINED:
                    ends[depth] = -1
                else:
                    if pos + length > n:
                        return -1
                    ends[depth] = pos + length
            else:
                return -2
            continue
        if group == 0xFFFE:  # in a data set only an item's end delimiter may appear
            if tag != 0xFFFEE00D or end >= 0 or depth == 0 or _u32(buf, pos + 4) != 0:
                return -2
            pos += 8
            depth -= 1
            continue
        if depth == 0:
            if meta_only and group != 2:
                return pos
            if tag <= last_tag:
                return -3
            last_tag = tag
        vr = 0
        if explicit:
            vr = (np.int64(buf[pos + 4]) << 8) | np.int64(buf[pos + 5])
            form = vr_form[vr]
            if form == 0:
                return -6
            if form == 2:
                if pos + 12 > n:
                    return -1
                length = _u32(buf, pos + 8)
                pos += 12
            else:
                length = _u16(buf, pos + 6)
                pos += 8
        else:
            length = _u32(buf, pos + 4)
            pos += 8
        if depth == 0:
            while w < wanted.shape[0] and wanted[w] < tag:
                w += 1
            if w < wanted.shape[0] and wanted[w] == tag:
                offsets[w] = pos
                lengths[w] = length
                vrs[w] = vr
        if length == _UNDEFINED:
            if tag == 0x7FE00010 or (explicit and vr != _SQ):
                return -5
            if depth + 1 >= _MAX_DEPTH:
                return -4
            depth += 1
            kinds[depth] = 1
            ends[depth] = -1
            continue
        pos += length


def scan(buf: np.ndarray, pos: int, explicit: bool, meta_only: bool, wanted: np.ndarray,
         offsets: np.ndarray, lengths: np.ndarray, vrs: np.ndarray) -> int:
    """See `_scan` (the VR table is passed in: Numba would copy a global into every build)."""
    return int(_scan(buf, pos, explicit, meta_only, wanted, offsets, lengths, vrs, _VR_FORM))


# ---------------------------------------------------------------------------- values


class NotSimple(Exception):
    """The file is not one this reader fully understands: read it with pydicom."""


class NativeDataset:
    """The whitelisted values of one simple file, as pydicom's `Dataset.get` gives them.

    Offers exactly what the pipeline's checks use: `get(keyword)`, `in`, and `file_meta`."""

    def __init__(self, values: dict[str, Any], meta: dict[str, Any]) -> None:
        self._values = values
        self.file_meta = meta

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword not in _EXPECTED_VR and keyword not in _OTHER:
            raise KeyError(f"{keyword} is not read by the native reader")
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values


def _text(raw: memoryview, *, identifier: bool = False) -> str:
    """ASCII value without padding; anything that is not plain printable ASCII, or holds
    several values, is left to pydicom (character sets, multi-values)."""
    data = bytes(raw)
    if identifier:
        data = data.rstrip(b"\x00")
    text = _printable(data)
    if "\\" in text:
        raise NotSimple
    return text.strip()


def _printable(data: bytes) -> str:
    """Printable ASCII text (space included), else NotSimple."""
    if not data.isascii():
        raise NotSimple
    text = data.decode("ascii")
    if not text.isprintable():
        raise NotSimple
    return text


def _convert(keyword: str, raw: memoryview, vr: int, explicit: bool) -> Any:
    expected = _EXPECTED_VR[keyword]
    if explicit:
        name = bytes((vr >> 8, vr & 0xFF))
        if name not in ((b"OB", b"OW") if expected == "PX" else (expected.encode(),)):
            raise NotSimple
    if expected == "PX":
        return raw
    if len(raw) == 0:
        return None
    if expected == "US":
        if len(raw) != 2:
            raise NotSimple
        return raw[0] | raw[1] << 8
    if expected == "DS":
        return _decimals(bytes(raw))
    text = _text(raw, identifier=expected == "UI")
    if expected == "IS":
        try:
            return int(text) if text else None
        except ValueError:
            raise NotSimple from None
    return text or None


def _decimals(data: bytes) -> float | list[float] | None:
    """DS: one float, or a list for several; as pydicom converts them."""
    parts = _printable(data).split("\\")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise NotSimple from None
    if any(not p.strip() for p in parts):
        raise NotSimple
    return values[0] if len(values) == 1 else values


def _meta(buf: np.ndarray, data: bytes) -> tuple[dict[str, Any], int, bool]:
    offsets = np.empty(len(_META_TAGS), dtype=np.int64)
    lengths, vrs = np.empty_like(offsets), np.empty_like(offsets)
    pos = scan(buf, 132, True, True, _META_TAGS, offsets, lengths, vrs)
    if pos <= 132:
        raise NotSimple
    meta: dict[str, Any] = {}
    for i, keyword in enumerate(_META_KEYWORDS):
        if offsets[i] >= 0:
            if bytes((vrs[i] >> 8, vrs[i] & 0xFF)) != b"UI":
                raise NotSimple
            meta[keyword] = _text(memoryview(data)[offsets[i]:offsets[i] + lengths[i]],
                                  identifier=True)
    ts = meta.get("TransferSyntaxUID")
    if ts not in _SYNTAXES or meta.get("MediaStorageSOPClassUID") \
            == dicom_uid.MediaStorageDirectoryStorage:
        raise NotSimple
    meta["TransferSyntaxUID"] = _SYNTAX_UIDS[ts]  # pydicom's own UID object, made once
    return meta, int(pos), _SYNTAXES[ts]


def parse(data: bytes) -> NativeDataset:
    """The values of a whole Part 10 file held in `data`; NotSimple when it is not plain."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise NotSimple
    buf = np.frombuffer(data, dtype=np.uint8)
    meta, start, explicit = _meta(buf, data)
    offsets = np.empty(len(_TAGS), dtype=np.int64)
    lengths, vrs = np.empty_like(offsets), np.empty_like(offsets)
    if scan(buf, start, explicit, False, _TAGS, offsets, lengths, vrs) != len(data):
        raise NotSimple
    view = memoryview(data)
    values: dict[str, Any] = {}
    for i, keyword in enumerate(_KEYWORDS):
        off = int(offsets[i])
        if off < 0:
            continue
        if keyword in _OTHER:
            raise NotSimple
        value = _convert(keyword, view[off:off + int(lengths[i])], int(vrs[i]), explicit)
        if value is not None:
            values[keyword] = value
    return NativeDataset(values, meta)


def read_native(path: Path) -> NativeDataset | None:
    """The file's values when it is a plain native file this reader handles, else None
    (including any I/O problem: the general path reports those)."""
    try:
        with open(path, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or not 144 <= st.st_size <= MAX_BYTES:
                return None
            data = fh.read()
        return parse(data)
    except (OSError, NotSimple):
        return None


def warm() -> None:
    """Compile (or load from Numba's cache) the walker, so the first file is not slow."""
    scan(np.zeros(16, dtype=np.uint8), 0, True, True, _TAGS, np.empty_like(_TAGS),
         np.empty_like(_TAGS), np.empty_like(_TAGS))

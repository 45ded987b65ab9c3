"""One DICOM file to what the store keeps: pseudonyms, a checked header, decoded frames.

The order is the de-identification and safety order: classify (CT/MR only), pseudonymise,
skip a known instance, check the declared header, decode (compressed data in `DecodePool`'s
crash-isolated workers). Plain native files are read by `dicom_native`; when its values fail a
check, the file is read again by pydicom, so a rejection always carries pydicom's reading of
the file (one reason for one file, whichever reader saw it first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.ingest.decode_worker import as_frames, decode_native
from agent.ingest.deid import Pseudonyms, pseudonymise
from agent.ingest.dicom_native import read_native
from agent.ingest.dicom_read import ImageHeader, classify, parse_header, read_dataset
from agent.ingest.quarantine import Rejected


@dataclass(frozen=True)
class Image:
    ids: Pseudonyms
    header: ImageHeader | None  # None: a known instance (duplicate), nothing decoded
    frames: np.ndarray | None  # [frames, rows, columns] stored values; None as above
                               # or when the caller asked not to decode compressed data


def read_image(path: Path, secret: bytes, *, known: Callable[[str], bool] = lambda sop: False,
               decode_compressed: Callable[[Path], np.ndarray] | None = None) -> Image:
    """Raises `Rejected` (quarantine or skip, with a reason) for a file that cannot be used.
    Without `decode_compressed`, compressed data comes back with `frames` None."""
    native = read_native(path)
    if native is not None:
        try:
            return _read(native, path, secret, known, decode_compressed)
        except Rejected:
            pass  # pydicom reads it again and names the reason
    return _read(read_dataset(path), path, secret, known, decode_compressed)


def _read(ds: Any, path: Path, secret: bytes, known: Callable[[str], bool],
          decode_compressed: Callable[[Path], np.ndarray] | None) -> Image:
    modality = classify(ds)
    ids = pseudonymise(ds, secret)
    if known(ids.sop):
        return Image(ids, None, None)
    header = parse_header(ds, modality)
    if header.compressed:
        if decode_compressed is None:
            return Image(ids, header, None)
        raw = decode_compressed(path)
    else:
        raw = decode_native(ds, header)
    return Image(ids, header, as_frames(raw, header))

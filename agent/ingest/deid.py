"""De-identification: a whitelist of attributes, keyed-hash pseudonyms, and silenced pydicom.

Nothing of a received data set is kept as a data set. The pipeline reads the few attributes in
`WHITELIST` (through `kept`, which refuses any other keyword) into typed numbers and enumerated
codes, and replaces the four identifiers in `HASHED` by HMAC-SHA256 pseudonyms under a secret
that never leaves the site. Everything else, including every nested sequence except the
geometry inside the multi-frame functional groups, is never read, so it cannot reach the store
or a log. The clinical table's id column goes through the same `pseudonym`, so images join
clinical rows without either side holding the raw id.

pydicom's warnings and log records can quote raw element values (a patient name in a
"bad value" warning); `quiet_pydicom` drops both while a file is being handled.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import DataError
from agent.ingest.quarantine import INVALID_ATTRIBUTE, MISSING_ATTRIBUTE, Rejected, with_keyword

log = logging.getLogger(__name__)

SECRET_FILE = "secret.key"
SECRET_BYTES = 32
PSEUDONYM_HEX = 32  # 128 bits: collision-free for any hospital's lifetime of ids

# Attributes the pipeline may read. Values are parsed into numbers or checked codes; none is
# stored as received text. Modality is derived from the SOP class, not read.
WHITELIST = frozenset({
    # what the object is and how its pixels are encoded
    "SOPClassUID", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "PixelData", "BurnedInAnnotation",
    # geometry and intensity (single-frame, or inside the functional groups below)
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept",
    # multi-frame functional groups: only the geometry/intensity items inside them
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
})
# Identifiers: read only to be replaced by pseudonyms at once.
HASHED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def kept(ds: Any, keyword: str) -> Any:
    """The value of a whitelisted attribute (None when absent); any other keyword is a bug.

    A value pydicom cannot convert becomes `invalid_attribute:<keyword>`."""
    if keyword not in WHITELIST:
        raise ValueError(f"{keyword} is not on the de-identification whitelist")
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on malformed values
        raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword)) from None


# ---------------------------------------------------------------------------- secret


def load_or_create_secret(state_dir: Path) -> bytes:
    """The site's pseudonymisation key: created once (32 random bytes, mode 0600), then reused.

    Created by writing a private temp file and hard-linking it into place, so two processes
    starting at once agree on one key and a crash never leaves a half-written key behind.
    Losing this file means new pseudonyms for every patient: back it up with the state dir.
    """
    state_dir = Path(state_dir)
    path = state_dir / SECRET_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".{SECRET_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process won the race
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise DataError(f"{path}: expected a {SECRET_BYTES}-byte key, found {len(data)} bytes; "
                        "restore it from backup (a new key would change every pseudonym)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); set to 0600", path, mode)
        os.chmod(path, 0o600)
    return data


def pseudonym(secret: bytes, value: str) -> str:
    """Keyed hash of an identifier: HMAC-SHA256, first 32 hex characters.

    Surrounding whitespace is ignored (DICOM pads values with spaces; tables may too), so the
    id "12345" in a clinical row and PatientID "12345 " in a header give the same pseudonym."""
    digest = hmac.new(secret, value.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX]


@dataclass(frozen=True)
class Pseudonyms:
    patient: str
    study: str
    series: str
    sop: str


def pseudonymise(ds: Any, secret: bytes) -> Pseudonyms:
    """Pseudonyms of the four identifiers; a missing or empty one quarantines the file."""
    out = {}
    for keyword in HASHED:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - malformed value
            raise Rejected(with_keyword(INVALID_ATTRIBUTE, keyword)) from None
        text = "" if value is None else str(value).strip()
        if not text:
            raise Rejected(with_keyword(MISSING_ATTRIBUTE, keyword))
        out[keyword] = pseudonym(secret, text)
    return Pseudonyms(patient=out["PatientID"], study=out["StudyInstanceUID"],
                      series=out["SeriesInstanceUID"], sop=out["SOPInstanceUID"])


# ---------------------------------------------------------------------------- quiet pydicom


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_DROP_ALL = _DropAll()
_PYDICOM_MODULES = r"pydicom(\.|$)"


def silence_pydicom_logging() -> None:
    """pydicom's logger never passes a record on, and warnings raised inside pydicom's own
    modules are ignored process-wide (idempotent). The process-wide warning filter backs up
    `quiet_pydicom` where threads interleave: `catch_warnings` restores the filter list per
    context, so with two ingesting threads one may briefly run with the other's restored
    (unfiltered) list."""
    logger = logging.getLogger("pydicom")
    if _DROP_ALL not in logger.filters:
        logger.addFilter(_DROP_ALL)
    if logger.level != logging.CRITICAL + 10:  # setLevel clears every logger's level cache
        logger.setLevel(logging.CRITICAL + 10)
    logger.propagate = False
    if not any(f[0] == "ignore" and getattr(f[3], "pattern", f[3]) == _PYDICOM_MODULES
               for f in warnings.filters):
        warnings.filterwarnings("ignore", module=_PYDICOM_MODULES)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Drop every warning raised while a DICOM file is read, decoded or de-identified."""
    silence_pydicom_logging()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

"""The original identifiers a result needs to be filed beside its study, kept while it is pending.

The image store only holds pseudonyms (agent/ingest/deid.py), but a Structured Report sent back
to the PACS must carry the study's real Patient and Study attributes, or the PACS files it under
a new, unknown patient. So at ingest time `read_reference` reads the few type-2 attributes the
SR copies (`REFERENCE_TAGS`, nothing else, no pixels), and `ReferenceBook` keeps them, keyed by
the series pseudonym, until the SR for that series has been sent; then `drop` forgets them.

The book holds PHI: its folder is 0700, its file 0600, deleted rows are overwritten
(`secure_delete`), and no value is ever logged or put into an exception message.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from agent.errors import DataError
from agent.ingest.deid import quiet_pydicom
from agent.ops.sqlitetx import immediate_tx

#: keyword in the file -> field of StudyReference (instances are read separately).
_FIELD_OF: dict[str, str] = {
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyInstanceUID": "study_uid",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "ReferringPhysicianName": "referring_physician",
    "SeriesInstanceUID": "series_uid",
    "Modality": "modality",
}
#: Every keyword `read_reference` reads. SpecificCharacterSet decodes names correctly.
REFERENCE_TAGS: tuple[str, ...] = (
    "SpecificCharacterSet", *_FIELD_OF, "SOPClassUID", "SOPInstanceUID",
)
#: Without these the SR cannot reference what was scored: the file is refused.
REQUIRED: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID",
                             "SOPInstanceUID")


@dataclass(frozen=True)
class StudyReference:
    """Identifiers of one scored series, as the PACS knows them. Empty string = absent."""

    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    referring_physician: str
    series_uid: str
    modality: str
    instances: tuple[tuple[str, str], ...]  # (SOPClassUID, SOPInstanceUID), in arrival order

    def __repr__(self) -> str:  # a stray log of the object must not print PHI
        return f"StudyReference(<{len(self.instances)} instance(s), values hidden>)"

    __str__ = __repr__


#: The scalar (non-instance) fields, in declaration order.
_SCALARS: tuple[str, ...] = tuple(f.name for f in fields(StudyReference) if f.name != "instances")


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def read_reference(path: Path) -> StudyReference:
    """One instance's reference, reading only `REFERENCE_TAGS` (no pixels, no other element).

    Raises DataError naming the file and the attribute when the file is unreadable or a UID in
    `REQUIRED` is missing or empty; the message never carries a value."""
    path = Path(path)
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(REFERENCE_TAGS))
            values = {keyword: _text(ds, keyword) for keyword in (*_FIELD_OF, *REQUIRED)}
    except (OSError, InvalidDicomError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on malformed values
        raise DataError(f"{path}: reference attributes unreadable ({type(exc).__name__})") from None
    for keyword in REQUIRED:
        if not values[keyword]:
            raise DataError(f"{path}: missing attribute {keyword}")
    return StudyReference(
        **{field: values[keyword] for keyword, field in _FIELD_OF.items()},
        instances=((values["SOPClassUID"], values["SOPInstanceUID"]),),
    )


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS series (
    pseudonym TEXT PRIMARY KEY,
    {", ".join(f"{name} TEXT NOT NULL" for name in _SCALARS)},
    added_order INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    pseudonym TEXT NOT NULL REFERENCES series(pseudonym) ON DELETE CASCADE,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    PRIMARY KEY (pseudonym, sop_instance_uid)
);
"""


class ReferenceBook:
    """Durable, private store of StudyReferences by series pseudonym, until the SR is sent.

    `<state_dir>/results/references.sqlite`, folder 0700 and file 0600 (it holds PHI that only
    ever goes back to the PACS it came from). Thread-safe: one lock, one connection."""

    FILE = "references.sqlite"

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "results"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # mkdir's mode is masked by the umask, and an old dir kept
        self.path = self.dir / self.FILE
        # Create the file 0600 before sqlite does: its journal files take the database's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA secure_delete=ON")  # a dropped reference is overwritten
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_tx(self._db, self._lock)

    def add(self, series_pseudonym: str, ref: StudyReference) -> None:
        """Record `ref` for the series; instances of the same series merge (idempotent per SOP
        instance). Blank attributes are filled from later instances; a different study or
        series UID under the same pseudonym is refused (DataError), values not shown."""
        with self._tx() as db:
            row = db.execute(f"SELECT {', '.join(_SCALARS)} FROM series WHERE pseudonym = ?",
                             (series_pseudonym,)).fetchone()
            if row is None:
                order = db.execute("SELECT COALESCE(MAX(added_order), 0) + 1 FROM series"
                                   ).fetchone()[0]
                db.execute(f"INSERT INTO series (pseudonym, {', '.join(_SCALARS)}, added_order) "
                           f"VALUES ({', '.join('?' * (len(_SCALARS) + 2))})",
                           (series_pseudonym, *(getattr(ref, n) for n in _SCALARS), order))
            else:
                old = dict(zip(_SCALARS, row, strict=True))
                for name in ("study_uid", "series_uid"):
                    if old[name] != getattr(ref, name):
                        raise DataError(f"reference book: series {series_pseudonym}: {name} "
                                        "differs from the one already recorded")
                blanks = [n for n in _SCALARS if not old[n] and getattr(ref, n)]
                if blanks:
                    db.execute(f"UPDATE series SET {', '.join(f'{n} = ?' for n in blanks)} "
                               "WHERE pseudonym = ?",
                               (*(getattr(ref, n) for n in blanks), series_pseudonym))
            db.executemany("INSERT OR IGNORE INTO instances (pseudonym, sop_instance_uid, "
                           "sop_class_uid) VALUES (?, ?, ?)",
                           [(series_pseudonym, sop, cls) for cls, sop in ref.instances])

    def get(self, series_pseudonym: str) -> StudyReference | None:
        """The merged reference of the series, or None when none is pending."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_SCALARS)} FROM series "
                                   "WHERE pseudonym = ?", (series_pseudonym,)).fetchone()
            if row is None:
                return None
            instances = self._db.execute(
                "SELECT sop_class_uid, sop_instance_uid FROM instances WHERE pseudonym = ? "
                "ORDER BY rowid", (series_pseudonym,)).fetchall()
        return StudyReference(**dict(zip(_SCALARS, row, strict=True)),
                              instances=tuple((c, s) for c, s in instances))

    def drop(self, series_pseudonym: str) -> None:
        """Forget the series (its SR was sent, or it will never be): no-op when unknown."""
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE pseudonym = ?", (series_pseudonym,))
            db.execute("DELETE FROM series WHERE pseudonym = ?", (series_pseudonym,))

    def pending(self) -> list[str]:
        """Series pseudonyms still waiting for their SR, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT pseudonym FROM series ORDER BY added_order").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReferenceBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

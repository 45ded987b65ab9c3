"""A model's result on one series as a DICOM Comprehensive Structured Report.

The SR is a new series in the scored study: the Patient and Study attributes are copied from the
StudyReference (so the PACS files it beside the study, under the right patient) and nothing else
identifying is written. Content tree (docs/results.md):

    CONTAINER  (99FEDSILO, RESULT, "Federated model result")       document title
      NUM      (DCM, 122157, "Probability")   unit (UCUM, 1, "no units")
      TEXT     (99FEDSILO, TARGET, "Predicted outcome")
      TEXT     (DCM, 111001, "Algorithm Name")      model kind
      TEXT     (DCM, 111003, "Algorithm Version")   model version (digest)
      TEXT     (99FEDSILO, FEDERATION, "Federation")
      TEXT     (99FEDSILO, ROUND, "Federation round")
      TEXT     (99FEDSILO, CREATED, "Result created (UTC)")
      UIDREF   (DCM, 112002, "Series Instance UID") the scored series
      TEXT     (DCM, 121106, "Comment")   "Research use only — not for clinical decisions"

Pure: no clock (the caller passes `now`), no network, no logging.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from agent import __version__
from agent.ops.atomic import write_atomic
from agent.results.reference import StudyReference

#: Private coding scheme for concepts without a standard code (declared in the SR itself).
SCHEME = "99FEDSILO"
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "fedsilo research result (not for clinical use)"
RESEARCH_ONLY = "Research use only — not for clinical decisions"
#: UTF-8: the disclaimer's dash and any patient name survive as they are.
CHARACTER_SET = "ISO_IR 192"

Code = tuple[str, str, str]  # (CodeValue, CodingSchemeDesignator, CodeMeaning)
TITLE: Code = ("RESULT", SCHEME, "Federated model result")
PROBABILITY: Code = ("122157", "DCM", "Probability")
NO_UNITS: Code = ("1", "UCUM", "no units")
TARGET: Code = ("TARGET", SCHEME, "Predicted outcome")
ALGORITHM_NAME: Code = ("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION: Code = ("111003", "DCM", "Algorithm Version")
FEDERATION: Code = ("FEDERATION", SCHEME, "Federation")
ROUND: Code = ("ROUND", SCHEME, "Federation round")
CREATED: Code = ("CREATED", SCHEME, "Result created (UTC)")
SCORED_SERIES: Code = ("112002", "DCM", "Series Instance UID")
COMMENT: Code = ("121106", "DCM", "Comment")


@dataclass(frozen=True)
class ModelResult:
    """What the model said about one series, and which model of which federation said it."""

    probability: float   # of `target`, 0..1
    target: str          # the predicted outcome's name, e.g. "poor_outcome_90d"
    model_kind: str      # e.g. "logistic", "cnn3d"
    model_version: str   # the global model's digest
    federation: str
    round: int           # the federation round that produced the model
    created_utc: str     # when the result was computed, ISO 8601

    def __post_init__(self) -> None:
        p = float(self.probability)
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")
        if not self.target or not self.model_version:
            raise ValueError("target and model_version must not be empty")


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _item(value_type: str, concept: Code) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([_code(concept)])
    return item


def _text(concept: Code, text: str) -> Dataset:
    item = _item("TEXT", concept)
    item.TextValue = text
    return item


def _num(concept: Code, value: float, unit: Code) -> Dataset:
    measured = Dataset()
    measured.NumericValue = format_number_as_ds(float(value))
    measured.FloatingPointValue = float(value)  # the exact double beside the 16-char DS
    measured.MeasurementUnitsCodeSequence = Sequence([_code(unit)])
    item = _item("NUM", concept)
    item.MeasuredValueSequence = Sequence([measured])
    return item


def _uidref(concept: Code, uid: str) -> Dataset:
    item = _item("UIDREF", concept)
    item.UID = uid
    return item


def _evidence(ref: StudyReference) -> Sequence:
    """CurrentRequestedProcedureEvidenceSequence: the study, the series, its instances."""
    series = Dataset()
    series.SeriesInstanceUID = ref.series_uid
    instances = []
    for sop_class, sop_instance in ref.instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        instances.append(item)
    series.ReferencedSOPSequence = Sequence(instances)
    study = Dataset()
    study.StudyInstanceUID = ref.study_uid
    study.ReferencedSeriesSequence = Sequence([series])
    return Sequence([study])


def _tz_offset(now: datetime) -> str | None:
    offset = now.utcoffset()
    if offset is None:
        return None
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def build_sr(ref: StudyReference, result: ModelResult, *, now: datetime,
             sop_instance_uid: str | None = None) -> Dataset:
    """The Comprehensive SR of `result` on the series of `ref`, as a new series of its study.

    `now` stamps ContentDate/Time (as given: pass the PACS's local time; an aware datetime adds
    TimezoneOffsetFromUTC). `sop_instance_uid` lets a retry resend the same instance, so a
    PACS that already has it sees a duplicate, not a second report."""
    sop_uid = sop_instance_uid or generate_uid()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"FEDSILO_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = CHARACTER_SET
    # SOP common
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    tz = _tz_offset(now)
    if tz is not None:
        ds.TimezoneOffsetFromUTC = tz
    # Patient and General Study: copied, so the PACS files the SR with the study
    ds.PatientName = ref.patient_name
    ds.PatientID = ref.patient_id
    ds.PatientBirthDate = ref.patient_birth_date
    ds.PatientSex = ref.patient_sex
    ds.StudyInstanceUID = ref.study_uid
    ds.StudyDate = ref.study_date
    ds.StudyTime = ref.study_time
    ds.ReferringPhysicianName = ref.referring_physician
    ds.StudyID = ref.study_id
    ds.AccessionNumber = ref.accession_number
    # SR Document Series: a new series of the study
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    # General Equipment
    ds.Manufacturer = "fedsilo"
    ds.ManufacturerModelName = "fedsilo site agent"
    ds.SoftwareVersions = __version__
    # SR Document General
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(ref)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "fedsilo local concepts"
    scheme.CodingSchemeResponsibleOrganization = "fedsilo project"
    ds.CodingSchemeIdentificationSequence = Sequence([scheme])
    # SR Document Content: the root container
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code(TITLE)])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = Sequence([
        _num(PROBABILITY, result.probability, NO_UNITS),
        _text(TARGET, result.target),
        _text(ALGORITHM_NAME, result.model_kind),
        _text(ALGORITHM_VERSION, result.model_version),
        _text(FEDERATION, result.federation),
        _text(ROUND, str(int(result.round))),
        _text(CREATED, result.created_utc),
        _uidref(SCORED_SERIES, ref.series_uid),
        _text(COMMENT, RESEARCH_ONLY),
    ])
    return ds


def sr_bytes(ds: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, Explicit VR Little Endian)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_sr(ds: Dataset, path: Path) -> None:
    """Write the SR as a Part 10 file, atomically and mode 0600: it names the patient."""
    data = sr_bytes(ds)
    write_atomic(Path(path), lambda fh: fh.write(data), mode=0o600)

"""Quarantine: files the agent cannot read, decode or place, kept aside under a PHI-free reason.

A bad file never stops ingest. It is copied (or moved, when the caller hands it over) to
`state_dir/quarantine/<reason>/<random>.dcm`: the random name keeps patient names that PACS
exports sometimes put in file names out of the tree, and the reason is a code from the list
below (plus, for some, `:<DICOM keyword>` from pydicom's dictionary), never a value read from
the file. The quarantined files themselves still hold PHI, so the folder is private (0700).

The folder has a cap in bytes (`dicom.quarantine_max_bytes`): a file that would go beyond it
is not quarantined (QUARANTINE_FULL, counted, logged) and stays where it was, so a flood of
bad files cannot fill the disk; the caller's own bound (`incoming/`'s) then refuses more.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Collection
from pathlib import Path

from agent.errors import DataError

log = logging.getLogger(__name__)

# Outcome statuses of one file.
STORED = "stored"
DUPLICATE = "duplicate"
QUARANTINED = "quarantined"
SKIPPED = "skipped"
DEFERRED = "deferred"  # only between a tree reader and the agent: "ingest this one yourself"
HELD = "held"  # a reason the caller asked to keep: the file stays where it is, not counted

# Quarantine reasons (the file is kept for a person to look at).
NOT_DICOM = "not_dicom"  # no DICOM preamble and not a plausible raw data set, or unparseable
EMPTY = "empty"  # a zero-byte file
TRUNCATED = "truncated"  # the file ends inside the data set or before the pixel data does
READ_FAILED = "read_failed"  # pydicom refused the data set for another reason
TOO_LARGE = "too_large"  # file, inflated data set or declared pixel data beyond the caps
DECODE_FAILED = "decode_failed"  # the codec reported an error
DECODE_CRASHED = "decode_crashed"  # the decoder process died (segfault, out of memory)
DECODE_TIMEOUT = "decode_timeout"  # decoding took longer than the per-file limit
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"  # no decoder installed for it
UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"  # colour, odd bit depth, not MONOCHROME
MISSING_ATTRIBUTE = "missing_attribute"  # + ":<keyword>"
INVALID_ATTRIBUTE = "invalid_attribute"  # + ":<keyword>"
SERIES_CLOSED = "series_closed"  # a new instance for a series that was already completed
STORE_FAILED = "store_failed"  # our own side failed (disk full, ...): the file is kept
INTERNAL_ERROR = "internal_error"  # a bug; logged with the exception type, never its message

# Skip reasons (nothing wrong with the file; the agent has no use for it).
NOT_CT_MR = "not_ct_mr"  # + ":<SOP class keyword>" ("unknown" for a UID pydicom lacks)
DICOMDIR = "dicomdir"  # a media directory; the files it lists are ingested on their own
BURNED_IN_ANNOTATION = "burned_in_annotation"  # pixels may carry burned-in patient text
NOT_A_FILE = "not_a_file"  # a directory, socket or dangling link

QUARANTINE_FULL = "quarantine_full"  # status: the quarantine is at its cap, file kept in place
RESCAN_S = 10.0  # a full quarantine is measured again at most this often (files deleted)

REASON_PATTERN = re.compile(r"^[a-z_]{1,40}(:[A-Za-z0-9_]{1,64})?$")


def with_keyword(code: str, keyword: str) -> str:
    """`code:keyword`; the keyword must come from pydicom's dictionary, never from a file."""
    reason = f"{code}:{keyword}"
    if not REASON_PATTERN.fullmatch(reason):
        raise ValueError(f"not a valid reason code: {reason!r}")
    return reason


class Rejected(DataError):
    """A file the pipeline will not store: `status` is QUARANTINED or SKIPPED, `reason` a code.

    The message is the reason only, so printing or logging it can never leak a DICOM value."""

    def __init__(self, reason: str, status: str = QUARANTINED) -> None:
        if not REASON_PATTERN.fullmatch(reason):
            raise ValueError(f"not a valid reason code: {reason!r}")
        self.reason = reason
        self.status = status
        super().__init__(reason)


def skip(reason: str) -> Rejected:
    return Rejected(reason, SKIPPED)


class Quarantine:
    """`root/<reason>/<random>.dcm`; counts per reason are read back from the tree."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        """`max_bytes`: the cap on what the folder holds (None: no cap)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.max_bytes = max_bytes
        self.refused_full = 0
        self._bytes = self.rescan() if max_bytes is not None else 0

    def rescan(self) -> int:
        """Measure what the folder holds now (a person may have deleted files)."""
        total = 0
        for f in self.files():
            try:
                total += f.stat().st_size
            except OSError:
                pass
        self._bytes, self._scanned_at = total, time.monotonic()
        return total

    def _room_for(self, path: Path) -> int | None:
        """The file's size if it fits under the cap, else None."""
        size = os.stat(path).st_size
        if self.max_bytes is None or self.root in Path(path).parents:
            return 0 if self.max_bytes is None else size  # a requeued file moves inside
        if self._bytes + size > self.max_bytes and \
                time.monotonic() - self._scanned_at >= RESCAN_S:
            self.rescan()
        return size if self._bytes + size <= self.max_bytes else None

    def put(self, path: Path, reason: str, *, consume: bool = False) -> Path | None:
        """Copy (or, with `consume`, move) `path` under `reason`; None if even that failed.

        Failing here is logged and swallowed: the input stays where it was, so nothing is lost.
        """
        if not REASON_PATTERN.fullmatch(reason):
            raise ValueError(f"not a valid reason code: {reason!r}")
        folder = self.root / reason
        target = folder / f"{secrets.token_hex(8)}.dcm"
        tmp = folder / f".{target.name}.tmp"
        try:
            size = self._room_for(path)
            if size is None:
                self.refused_full += 1
                log.error("%s: quarantine %s holds %d bytes (dicom.quarantine_max_bytes %d); a "
                          "file for %s is kept where it was", QUARANTINE_FULL, self.root,
                          self._bytes, self.max_bytes, reason)
                return None
            folder.mkdir(mode=0o700, exist_ok=True)
            if self.root in Path(path).parents:
                size = 0
            if consume:
                try:
                    os.replace(path, target)  # same file system: a cheap, atomic move
                    os.chmod(target, 0o600)
                    self._bytes += size
                    return target
                except OSError:
                    pass
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
            self._bytes += size
            if consume:
                Path(path).unlink(missing_ok=True)
            return target
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("could not quarantine a file under %s (%s)", reason, type(exc).__name__)
            return None

    def files(self, reasons: Collection[str] = ()) -> list[Path]:
        """The files held under `reasons` (every reason when empty), by reason and name."""
        for reason in reasons:
            if not REASON_PATTERN.fullmatch(reason):
                raise ValueError(f"not a valid reason code: {reason!r}")
        folders = [self.root / r for r in reasons] if reasons else sorted(
            f for f in self.root.iterdir() if REASON_PATTERN.fullmatch(f.name))
        return [f for folder in folders if folder.is_dir() for f in sorted(folder.iterdir())
                if f.suffix == ".dcm" and not f.name.startswith(".") and f.is_file()]

    def counts(self) -> dict[str, int]:
        """Files held per reason (what the site status reports)."""
        out: dict[str, int] = {}
        if not self.root.is_dir():
            return out
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and REASON_PATTERN.fullmatch(folder.name):
                n = sum(1 for f in folder.iterdir() if f.suffix == ".dcm"
                        and not f.name.startswith("."))
                if n:
                    out[folder.name] = n
        return out

"""DICOM C-STORE listener (Storage SCP): the network edge where a PACS pushes studies to the site.

Why it looks like this:
- Every standard storage SOP class is *negotiated*, but only CT and MR (plain and enhanced) are
  *stored*. A PACS routing a whole study then gets a per-instance DIMSE status 0x0122 for, say,
  a dose report, instead of a presentation-context rejection that many PACS treat as a failed
  route and retry forever.
- Received instances are written as the raw bytes the peer sent (`event.encoded_dataset()`), so
  nothing is decoded here, no pydicom warning can print patient data, and the file on disk is
  exactly what the PACS sent. The name is random: a name taken from the dataset could carry PHI.
- Success (0x0000) is answered only after the file is fsync'ed and renamed into place and
  `on_file` has accepted it: a PACS may delete its copy once we say "stored".
- Association policy is an allow-list of calling AE titles. An empty list refuses everyone
  (a listener open to any caller on a hospital network is the unsafe default).
- Logs carry SOP class keyword, calling AE and size, never element values; pynetdicom's own
  logger is capped at WARNING because its debug output dumps whole datasets.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from agent.config import DicomSources
from agent.errors import FedsiloError
from agent.ingest.watch import DICOM_SUFFIX, unlink_quietly
from agent.ops.atomic import write_atomic

log = logging.getLogger(__name__)

OnFile = Callable[[Path, str], None]

#: Transfer syntaxes accepted on every storage context. The order is our preference when a
#: requestor offers several in one context (pynetdicom takes the acceptor's first match):
#: uncompressed, then lossless, then lossy, so we never pick lossy when the sender has better.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,        # 1.2.840.10008.1.2.4.70
    JPEGLossless,           # .57 (process 14)
    JPEGLSLossless,         # .80
    JPEG2000Lossless,       # .90
    RLELossless,            # 1.2.840.10008.1.2.5
    JPEGLSNearLossless,     # .81
    JPEG2000,               # .91 (lossless or lossy)
    JPEGExtended12Bit,      # .51
    JPEGBaseline8Bit,       # .50
)

#: SOP classes whose instances are stored; every other storage class is answered 0x0122.
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",      # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR Image Storage
})

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700

#: A-ASSOCIATE-RJ: rejected-permanent, by the DUL service user, calling AE title not recognised.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_REASONS = {
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised (must be dicom.ae_title)",
    (0x03, 0x02): "local limit exceeded (too many associations)",
}

#: Largest PDU we ask peers to send (bytes). Bigger PDUs mean fewer round trips for CT series.
MAX_PDU_SIZE = 1 << 20
MAX_ASSOCIATIONS = 10
STOP_WAIT_S = 5.0  # how long stop() waits for association threads to end


@dataclass
class _Tally:
    calling: str
    stored: int = 0
    refused: int = 0
    failed: int = 0
    bytes: int = 0


def _keyword(uid: str) -> str:
    """A loggable name for a SOP class (keyword if known, else the UID itself: never PHI)."""
    return UID(uid).keyword or str(uid)


class DicomListener:
    """A non-blocking Storage SCP feeding received CT/MR instances to `on_file`.

    `on_file(path, "dicom:<calling AE>")` is called from pynetdicom's association threads, one
    per instance, possibly concurrently: it must be thread-safe and quick (enqueue, not process).
    """

    def __init__(self, config: DicomSources, incoming_dir: Path, on_file: OnFile) -> None:
        self.config = config
        self.incoming_dir = Path(incoming_dir)
        self.on_file = on_file
        self._allowed = frozenset(a.strip() for a in config.allowed_callers)
        self._ae: AE | None = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._tally: dict[int, _Tally] = {}  # per association, summarised at close
        self.port: int | None = None

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> int:
        """Open the port and serve in background threads; returns the bound port.

        Raises FedsiloError (one line, no traceback needed) when the address cannot be bound.
        """
        with self._lock:
            if self._server is not None:
                return self.port  # type: ignore[return-value]
            # pynetdicom at DEBUG logs whole datasets (PHI); cap it whatever the root level is.
            logging.getLogger("pynetdicom").setLevel(logging.WARNING)
            self.incoming_dir.mkdir(parents=True, exist_ok=True)
            if not self._allowed:
                log.warning("DICOM listener: dicom.allowed_callers is empty, so every "
                            "association will be rejected (calling AE title not recognised); "
                            "list the PACS AE titles that may send studies")
            ae = self._ae = self._build_ae()
            handlers = [
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_CONN_CLOSE, self._on_close),
            ]
            try:
                self._server = ae.start_server((self.config.bind, self.config.port),
                                               block=False, evt_handlers=handlers)
            except OSError as exc:  # port taken, privileged port, bad bind address
                self._ae = None
                raise FedsiloError(f"DICOM listener cannot listen on {self.config.bind}:"
                                   f"{self.config.port}: {exc.strerror or exc}") from exc
            self.port = int(self._server.server_address[1])
        log.info("DICOM listener %s on %s:%d (%d allowed caller(s))", self.config.ae_title,
                 self.config.bind, self.port, len(self._allowed))
        return self.port

    def stop(self) -> None:
        """Close the port and abort associations in progress (the sender retries; a file is
        either complete in incoming_dir or absent). Safe to call twice."""
        with self._lock:
            ae, server, self._ae, self._server = self._ae, self._server, None, None
        if ae is None:
            return
        server.shutdown()  # no new connections
        # Abort only established associations: aborting one we just rejected (DUL waiting for
        # the peer to close) makes pynetdicom's state machine raise in its thread.
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            live = [a for a in ae.active_associations if a.is_acceptor]
            for assoc in live:
                if assoc.is_established and not assoc.is_aborted:
                    assoc.abort()
            # Only transfers are waited for (aborted just now, their handler may still run).
            # A connection that never asked for an association (a TCP health check or port
            # probe) idles in pynetdicom's network timer and would delay every stop by
            # STOP_WAIT_S; released and rejected ones have nothing left to write either.
            busy = [a for a in live if a.is_established or a.is_aborted]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        log.info("DICOM listener %s stopped", self.config.ae_title)

    def __enter__(self) -> DicomListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        # Second lock on the door: pynetdicom's own check. It treats [] as "anyone", so the
        # empty-list refusal lives in `_on_requested` alone.
        ae.require_calling_aet = sorted(self._allowed)
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.add_supported_context(Verification)
        # ~170 storage SOP classes: fine as acceptor (the 128-context limit binds the requestor;
        # a peer can propose at most 128 in one association and we match whichever it sends).
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        return ae

    # -------------------------------------------------------------------------------- handlers

    def _on_requested(self, event: Any) -> None:
        """Association policy: only allow-listed calling AE titles get past the door."""
        calling = "?"
        try:
            calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
            if calling in self._allowed:
                return
        except Exception:  # pynetdicom would swallow it and go on negotiating: fail closed
            pass
        log.warning("DICOM listener: rejected association from calling AE %r at %s "
                    "(not in dicom.allowed_callers)", calling, event.assoc.requestor.address)
        event.assoc.acse.send_reject(*_REJECT_CALLING_AE)
        event.assoc.kill()

    def _on_rejected(self, event: Any) -> None:
        """Log pynetdicom's own rejections (wrong called AE, too many associations)."""
        rq = event.assoc.requestor.primitive
        rj = event.assoc.acceptor.primitive
        key = (getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
        log.warning("DICOM listener: rejected association from %r calling %r: %s",
                    str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip(),
                    _REJECT_REASONS.get(key, f"source/diagnostic {key}"))

    def _on_echo(self, event: Any) -> int:
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        """Store CT/MR atomically, refuse other classes with 0x0122, say 0xA700 on failure."""
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        name = _keyword(sop_class)
        tally = self._tally_for(event.assoc, calling)
        if sop_class not in ACCEPTED_SOP_CLASSES:
            log.debug("C-STORE %s from %s refused: SOP class not supported", name, calling)
            tally.refused += 1
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        try:
            data = event.encoded_dataset()
            path = self._write(data)
        except Exception as exc:  # any failure here means "could not store"
            log.error("C-STORE %s from %s: could not store (%s)", name, calling,
                      type(exc).__name__)
            tally.failed += 1
            return STATUS_OUT_OF_RESOURCES
        try:
            self.on_file(path, f"dicom:{calling}")
        except Exception as exc:  # queue refused: undo, let the PACS retry
            log.error("C-STORE %s from %s: ingest queue refused the file (%s)", name, calling,
                      getattr(exc, "reason", type(exc).__name__))
            unlink_quietly(path)
            tally.failed += 1
            return STATUS_OUT_OF_RESOURCES
        log.debug("C-STORE %s from %s: stored %d bytes as %s", name, calling, len(data),
                  path.name)
        tally.stored += 1
        tally.bytes += len(data)
        return STATUS_SUCCESS

    def _tally_for(self, assoc: Any, calling: str) -> _Tally:
        with self._lock:
            return self._tally.setdefault(id(assoc), _Tally(calling))

    def _on_close(self, event: Any) -> None:
        """One INFO line per association instead of one per slice (a CT series is 500)."""
        with self._lock:
            t = self._tally.pop(id(event.assoc), None)
        if t is not None:
            log.info("DICOM association from %s closed: %d stored (%.1f MB), %d refused "
                     "(not CT/MR), %d failed", t.calling, t.stored, t.bytes / 1e6, t.refused,
                     t.failed)

    def _write(self, data: bytes) -> Path:
        """Write-temp, fsync, rename, fsync dir: the file appears whole or not at all."""
        final = self.incoming_dir / f"{secrets.token_hex(16)}{DICOM_SUFFIX}"
        write_atomic(final, lambda fh: fh.write(data), mode=0o600)
        return final

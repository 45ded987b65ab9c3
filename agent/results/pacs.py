"""Send a result SR to the hospital PACS with C-STORE (pynetdicom as the SCU).

One association per report: the agent sends a handful a day, and a fresh association means a
PACS restart between two reports costs nothing. Every failure is a `PacsError` whose message
names the node (`AE@host:port`) and what happened, never a dataset value. pynetdicom's own
logger is capped at WARNING (as in agent/ingest/listener.py): at DEBUG it dumps whole datasets.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from agent.config.site import PacsNode  # the [results.pacs] table, as read
from agent.errors import FedsiloError

__all__ = ["PacsError", "PacsNode", "send_sr"]

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored" (Warning: stored with coercion/elements discarded).
STATUS_SUCCESS = 0x0000
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


class PacsError(FedsiloError):
    """The PACS could not be reached, refused the association, or did not store the SR."""


def _ae(node: PacsNode) -> AE:
    ae = AE(ae_title=node.calling_ae_title)
    ae.add_requested_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
    ae.connection_timeout = node.timeout_s
    ae.acse_timeout = node.timeout_s
    ae.dimse_timeout = node.timeout_s
    ae.network_timeout = node.timeout_s
    return ae


def send_sr(ds: Dataset, node: PacsNode) -> None:
    """C-STORE `ds` (a Comprehensive SR) to `node`; returns once the PACS said it stored it.

    Raises PacsError when the TCP connection fails, the association is rejected or aborted,
    the PACS accepts no Comprehensive SR context, or the C-STORE status is not success (a
    warning status counts as stored and is logged)."""
    # pynetdicom at INFO/DEBUG logs every association and whole datasets (PHI): cap it.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    connected: list[bool] = []
    rejection: list[str] = []

    def on_pdu(event: evt.Event) -> None:
        # The PACS often closes the socket right after its A-ASSOCIATE-RJ, and pynetdicom may
        # see the close first and call it an abort: the PDU itself says what happened.
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ):
            rejection.append(f"{pdu.result_str}, {pdu.source_str}: {pdu.reason_str}")

    handlers = [(evt.EVT_CONN_OPEN, lambda event: connected.append(True)),
                (evt.EVT_PDU_RECV, on_pdu)]
    try:
        assoc = _ae(node).associate(node.host, node.port, ae_title=node.ae_title,
                                    evt_handlers=handlers)
    except (OSError, RuntimeError, ValueError) as exc:
        raise PacsError(f"PACS {node}: association failed ({type(exc).__name__})") from None
    if not assoc.is_established:
        if assoc.is_rejected or rejection:
            what = "association rejected" + (f" ({rejection[0]})" if rejection else "")
        elif not connected:
            what = "could not connect (refused, unreachable or timed out)"
        elif assoc.is_aborted:
            what = "association aborted"
        else:
            what = "no association (no answer within the timeout)"
        raise PacsError(f"PACS {node}: {what}")
    try:
        if not any(c.abstract_syntax == ComprehensiveSRStorage for c in assoc.accepted_contexts):
            raise PacsError(f"PACS {node}: accepted no presentation context for "
                            "Comprehensive SR Storage (Explicit VR Little Endian)")
        try:
            status = assoc.send_c_store(ds)
        except (OSError, RuntimeError, ValueError, AttributeError) as exc:
            raise PacsError(f"PACS {node}: C-STORE not sent ({type(exc).__name__})") from None
        code = status.get("Status") if status else None
        if code is None:
            raise PacsError(f"PACS {node}: no C-STORE response (timed out or aborted)")
        if code in WARNING_STATUSES:
            log.warning("PACS %s stored the SR with warning status 0x%04X", node, code)
        elif code != STATUS_SUCCESS:
            raise PacsError(f"PACS {node}: C-STORE failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()

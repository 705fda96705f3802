"""`kaapana receive`: a pynetdicom Storage SCP writing every received instance durably
into the spool that the incoming_studies sensor watches.

- All storage SOP classes (SEG included) and Verification are accepted.
- A C-STORE is acknowledged only after its file is durable (fsync, then rename).
- The calling and called AE titles go into the file meta (0002,0016)/(0002,0018), and
  from there into the `instances` table.
- An optional allow-list of calling AE titles; anyone else is refused.
- TCP_NODELAY on every connection (Nagle + delayed ACK cap storescu at ~20 instances/s).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from kaapana_assets.ingest.headers import Reason, Rejected, parse_header
from kaapana_assets.network.spool_writer import part10_bytes, safe_ae_title, spool_name, write_durably

log = logging.getLogger("kaapana.receiver")

UNREADABLE = {Reason.MALFORMED, Reason.TRUNCATED, Reason.NOT_DICOM}
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700


def _nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _store(event: evt.Event, spool: Path) -> int:
    calling = event.assoc.requestor.ae_title.strip()
    called = event.assoc.acceptor.ae_title.strip()
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = calling
    meta.ReceivingApplicationEntityTitle = called
    raw = event.request.DataSet.getvalue()  # the data set exactly as it arrived
    data = part10_bytes(meta, raw)
    # The ingest's own parser decides: undecodable or truncated data sets are refused here;
    # valid DICOM with other problems (missing tags, bad UIDs) is stored and quarantined later.
    sop_uid = event.request.AffectedSOPInstanceUID
    try:
        parse_header(data)
    except Rejected as exc:
        if exc.reason in UNREADABLE:
            log.warning("refused a malformed data set %s from %s (%s): %s: %s; nothing stored", sop_uid, calling,
                        event.assoc.requestor.address, exc.reason, exc.message)
            return CANNOT_UNDERSTAND
    try:
        path = write_durably(spool / safe_ae_title(calling), spool_name(sop_uid, data), data)
    except OSError as exc:
        log.error("could not store %s from %s: %s", sop_uid, calling, exc)
        return OUT_OF_RESOURCES
    log.debug("stored %s from %s as %s", sop_uid, calling, path.name)
    return SUCCESS


def _acse_received(event: evt.Event, allowed: set[str] | None) -> None:
    """Log refusals by the allow-list (pynetdicom's require_calling_aet does the refusing)."""
    primitive = getattr(event, "primitive", None)
    calling = getattr(primitive, "calling_ae_title", None)
    if allowed is None or calling is None or getattr(primitive, "result", None) is not None:
        return  # not an A-ASSOCIATE request
    calling = str(calling).strip()
    if calling not in allowed:
        log.warning("refused association from %s (%s): calling AE title not in the allow-list", calling,
                    event.assoc.requestor.address)


def _aborted(event: evt.Event) -> None:
    log.warning("association from %s aborted; instances not completely received were not stored",
                event.assoc.requestor.ae_title.strip())


def build_receiver(ae_title: str = "KAAPANA", allowed_calling: Sequence[str] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    transfer_syntaxes = list(AllTransferSyntaxes)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, transfer_syntaxes)
    ae.add_supported_context(Verification)
    ae.maximum_associations = 16
    if allowed_calling:
        ae.require_calling_aet = list(allowed_calling)
    return ae


def start_receiver(
    spool: Path,
    host: str = "127.0.0.1",
    port: int = 11112,
    ae_title: str = "KAAPANA",
    allowed_calling: Sequence[str] | None = None,
    block: bool = False,
):  # type: ignore[no-untyped-def]
    """Start the SCP; non-blocking returns the server (call .shutdown() to stop)."""
    ae = build_receiver(ae_title, allowed_calling)
    allowed = set(allowed_calling) if allowed_calling else None
    handlers = [
        (evt.EVT_CONN_OPEN, _nodelay),
        (evt.EVT_ACSE_RECV, _acse_received, [allowed]),
        (evt.EVT_C_STORE, _store, [spool]),
        (evt.EVT_ABORTED, _aborted),
    ]
    log.info("receiving as %s on %s:%d into %s%s", ae_title, host, port, spool,
             f" (allowed: {', '.join(sorted(allowed))})" if allowed else "")
    return ae.start_server((host, port), block=block, evt_handlers=handlers)

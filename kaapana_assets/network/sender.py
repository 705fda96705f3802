"""Send DICOM files to a remote node with C-STORE (pynetdicom SCU): retries with backoff,
and a record of what was sent in the `sent` Delta table."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from kaapana_assets.lake import Lake
from kaapana_assets.lake.digest import row_digest
from kaapana_assets.lake.schemas import SENT

log = logging.getLogger("kaapana.sender")
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class DicomNode:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class SendOutcome:
    path: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    status: str
    dimse_status: int | None
    attempts: int
    error: str | None = None


def _nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_files(
    paths: Sequence[Path | str],
    node: DicomNode,
    calling_ae_title: str = "KAAPANA",
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
) -> list[SendOutcome]:
    """C-STORE every file in one association (re-associating on failure, up to `retries`
    attempts per instance). Files are sent in the transfer syntax they are stored in."""
    datasets = []
    for p in paths:
        ds = pydicom.dcmread(p)
        datasets.append((str(p), ds))
    contexts: dict[tuple[str, str], None] = {}
    for _, ds in datasets:
        contexts[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP class/transfer syntax pairs; at most {MAX_CONTEXTS} per association")
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))

    outcomes: dict[str, SendOutcome] = {
        path: SendOutcome(path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                          str(ds.SOPClassUID), "failed", None, 0)
        for path, ds in datasets
    }
    pending = list(datasets)
    for attempt in range(1, retries + 1):
        if not pending:
            break
        if attempt > 1:
            time.sleep(backoff_s * 2 ** (attempt - 2))
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if not assoc.is_established:
            log.warning("attempt %d: no association with %s", attempt, node)
            for path, _ in pending:
                outcomes[path].attempts = attempt
                outcomes[path].error = f"no association with {node}"
            continue
        still = []
        try:
            for path, ds in pending:
                outcomes[path].attempts = attempt
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                outcomes[path].dimse_status = code
                if code is not None and code in (0x0000, 0xB000, 0xB007, 0xB006):  # success or warning
                    outcomes[path].status, outcomes[path].error = "success", None
                elif code is None:  # connection lost mid-association: retry
                    outcomes[path].error = "no response (association lost)"
                    still.append((path, ds))
                else:  # refused by the remote: retrying will not help
                    outcomes[path].error = f"refused with status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()
        pending = [p for p in still if outcomes[p[0]].status != "success"]
    return list(outcomes.values())


def record_sent(lake: Lake, outcomes: list[SendOutcome], node: DicomNode) -> int | None:
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for o in outcomes:
        row = {"sop_instance_uid": o.sop_instance_uid, "destination": str(node), "study_uid": o.study_uid,
               "series_uid": o.series_uid, "sop_class_uid": o.sop_class_uid, "status": o.status,
               "dimse_status": o.dimse_status, "attempts": o.attempts, "error": o.error, "sent_at": now}
        row["row_digest"] = row_digest(row)  # not sent_at: an unchanged re-send rewrites nothing
        rows.append(row)
    return lake.merge(SENT, pa.Table.from_pylist(rows, schema=SENT.schema)).version

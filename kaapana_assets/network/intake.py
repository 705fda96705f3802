"""The intake that every way into the spool shares: the C-STORE receiver (`receiver.py`) and
STOW-RS (`dicomweb/stow.py`) hand one arrived data set to `admit`, which checks it with the
ingest's own parser, refuses it with a DICOM status code or stores it durably through a
`ReceiveJournal`, and logs the outcome in one format. What is refused and why is documented
in `receiver.py`'s docstring; the codes are the Storage Service Class's (PS3.4 B.2.3), which
STOW-RS answers as its FailureReason (PS3.18 10.5.3)."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from kaapana_assets.ingest import headers
from kaapana_assets.ingest.headers import InstanceHeader, Reason, Rejected, parse_header
from kaapana_assets.network.journal import ReceiveJournal
from kaapana_assets.network.spool_writer import safe_ae_title, spool_name
from kaapana_assets.projects.routing import project_spool

# C-STORE response statuses (PS3.4 B.2.3; pynetdicom lists them in
# pynetdicom.status.STORAGE_SERVICE_CLASS_STATUS but names none of them).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set Does Not Match SOP Class
CANNOT_UNDERSTAND = 0xC210  # Error: Cannot Understand (0xC000-0xCFFF)

# Data sets we cannot read at all; any other rejection is a readable data set that does
# not carry what its SOP class requires of it (for us: what the ingest needs).
UNREADABLE = {Reason.MALFORMED, Reason.TRUNCATED, Reason.NOT_DICOM, Reason.EXCEEDS_LIMITS, Reason.NO_FILE_META}

# A data set whose SOP Instance/Class UID is not the one its sender announced.
UID_MISMATCH = "uid_mismatch"

_INFLATE_LOCK = threading.Lock()


def describe_status(code: int) -> str:
    """`0xC210 Failure: Cannot Understand` — for log lines."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    return f"0x{code:04X} {code_to_category(code)}" + (f": {meaning}" if meaning else "")


def status_for(reason: str) -> int:
    return CANNOT_UNDERSTAND if reason in UNREADABLE else DATA_SET_DOES_NOT_MATCH_SOP_CLASS


@dataclass(frozen=True)
class Refusal:
    reason: str  # a `Reason`, or UID_MISMATCH, or a caller's own (STOW-RS: a study mismatch)
    message: str
    status: int  # the DICOM status the sender is answered


@dataclass(frozen=True)
class Announced:
    """The SOP Instance and Class UIDs a sender announced beside the data set (a C-STORE
    request's Affected* UIDs; a Part 10 file's MediaStorage* UIDs), and what it calls them."""

    sop_instance_uid: str
    sop_class_uid: str
    source: str = "C-STORE request"
    instance_keyword: str = "AffectedSOPInstanceUID"
    class_keyword: str = "AffectedSOPClassUID"


@dataclass(frozen=True)
class Arrival:
    """One data set as it arrived, already framed as the Part 10 file the spool will hold."""

    data: bytes  # preamble, file meta, then the data set byte for byte as it arrived
    encoded: bytes | memoryview  # the data set alone
    transfer_syntax: str
    announced: Announced
    calling: str  # who sent it: the calling AE title, or the service's own name (STOW-RS)
    address: str  # where from, for the log
    # The research project it was sent to (a KP-<PROJECT> called AE title, a STOW-RS project
    # path): it waits in that project's spool folder, which the ingest assigns from. None: the plain spool.
    project: str | None = None


@dataclass(frozen=True)
class Outcome:
    status: int
    refusal: Refusal | None = None
    header: InstanceHeader | None = None  # of a stored data set
    path: Path | None = None  # where it was stored


def inflates_beyond(deflated: bytes | memoryview, cap: int, step: int = 2**20) -> bool:
    """Whether a raw deflate stream inflates to more than `cap` bytes, found streaming:
    at most `step` inflated bytes exist at any time. Streams that do not inflate at all
    are left to the parser (False)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view, total = memoryview(deflated), 0
    try:
        # Input in 64 KiB pieces: the unconsumed tail (a copy) stays small as well.
        for start in range(0, len(view), 2**16):
            pending: bytes | memoryview = view[start:start + 2**16]
            while pending:
                total += len(inflater.decompress(pending, step))
                if total > cap:
                    return True
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        total += len(inflater.flush())
    except zlib.error:
        return False
    return total > cap


def check(arrival: Arrival) -> Refusal | InstanceHeader:
    """Why this data set is refused, or its header when it can be stored."""
    encoded, transfer_syntax = arrival.encoded, arrival.transfer_syntax
    if len(encoded) == 0:
        return Refusal(Reason.NOT_DICOM, "empty data set (0 bytes)", CANNOT_UNDERSTAND)
    if transfer_syntax == DeflatedExplicitVRLittleEndian and inflates_beyond(encoded, headers.MAX_INFLATED_BYTES):
        limit = headers.MAX_INFLATED_BYTES // 2**20
        return Refusal(Reason.EXCEEDS_LIMITS, f"deflated data set inflates beyond {limit} MiB", CANNOT_UNDERSTAND)
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            with _INFLATE_LOCK:  # one inflated copy (≤ MAX_INFLATED_BYTES) at a time
                header = parse_header(arrival.data)
        else:
            header = parse_header(arrival.data)
    except Rejected as exc:
        if exc.reason == Reason.MISSING_TAG and exc.sop_uid is None and exc.study_uid is None:
            # Nothing that identifies an instance could be read: the parser's lenient path
            # takes random bytes for one huge element; we do not understand such a data set.
            return Refusal(exc.reason, f"{exc.message} (no SOP Instance UID, no Study Instance UID: not understood)",
                           CANNOT_UNDERSTAND)
        return Refusal(exc.reason, exc.message, status_for(exc.reason))
    announced = arrival.announced
    mismatches = [
        f"{keyword} in the data set {ours} differs from the {announced.source}'s {theirs_keyword} {theirs}"
        for keyword, ours, theirs_keyword, theirs in (
            ("SOPInstanceUID", header.sop_instance_uid, announced.instance_keyword, announced.sop_instance_uid),
            ("SOPClassUID", header.sop_class_uid, announced.class_keyword, announced.sop_class_uid),
        )
        if ours != str(theirs or "").strip()
    ]
    if mismatches:
        return Refusal(UID_MISMATCH, "; ".join(mismatches), DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    return header


def admit(arrival: Arrival, journal: ReceiveJournal, log: logging.Logger,
          require: Callable[[InstanceHeader], Refusal | None] | None = None) -> Outcome:
    """Check the data set (and the caller's own `require`ment of a readable one), then store it
    durably into the spool folder of its sender (within its project's, when it names one), or refuse it: nothing of a refused data set
    reaches the spool. Durable when this returns SUCCESS (see `ReceiveJournal.store`)."""
    sop_uid, calling, address = arrival.announced.sop_instance_uid, arrival.calling, arrival.address
    checked = check(arrival)
    refusal = checked if isinstance(checked, Refusal) else (require(checked) if require is not None else None)
    if refusal is not None:
        log.warning("refused %s from %s at %s: %s: %s; answered %s, nothing stored", sop_uid, calling, address,
                    refusal.reason, refusal.message[:500], describe_status(refusal.status))
        return Outcome(refusal.status, refusal)
    assert isinstance(checked, InstanceHeader)
    try:
        spool = journal.spool if arrival.project is None else project_spool(journal.spool, arrival.project)
        path = journal.store(spool / safe_ae_title(calling), spool_name(sop_uid, arrival.data), arrival.data)
    except OSError as exc:
        log.error("could not store %s from %s at %s: %s; answered %s", sop_uid, calling, address, exc,
                  describe_status(OUT_OF_RESOURCES))
        return Outcome(OUT_OF_RESOURCES, Refusal(Reason.IO_ERROR, str(exc), OUT_OF_RESOURCES))
    log.debug("stored %s from %s as %s", sop_uid, calling, path.name)
    return Outcome(SUCCESS, header=checked, path=path)

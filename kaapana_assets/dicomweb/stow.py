"""STOW-RS (PS3.18 10.5): `POST /studies` and `POST /studies/{study}` with
multipart/related; type="application/dicom", one DICOM Part 10 file per part.

Each part goes through the C-STORE receiver's intake (`network/intake.py` `admit`): the same
checks, the same refusal codes, the same durable store into the spool, which the ingest
watches as it watches the receiver's files. The part's data set is stored byte for byte as it
arrived, after a file meta group that we write as the receiver does (its Sending Application
Entity Title "STOW-RS", so the index records how the instance came; spool folder
`incoming/STOW-RS/`). The file meta's MediaStorageSOPInstanceUID/ClassUID play the C-STORE
request's Affected* UIDs: a data set that differs from them is refused as the receiver
refuses it. With a study in the path, a part of another study is refused (0xA900, as any data
set that does not match what its request announced). `POST /projects/{project}/studies[/{study}]`
stores into that research project's spool folder (`incoming/projects/{project}/STOW-RS/`), and
the ingest assigns the series to it; an unknown project answers 404, a malformed name 400.

Durability: the service holds a receive journal segment of its own beside the spool
(`ReceiveJournal`, which lets several writers share a spool, each with its own flock'd
segment), used as the receiver uses its own: an instance is stored once its record is
appended and flushed, its spool file written by the journal's writer thread (retried at every
checkpoint on a full disk, 0xA700 once the segment is full), and the answer waits for the
spool files as the receiver holds an association's release. After a crash, the next receiver
or service to open the spool writes back what the journal holds.

Answer (application/dicom+json): ReferencedSOPSequence for the stored instances (with their
RetrieveURL), FailedSOPSequence with the FailureReason the receiver would have answered for
the refused ones; 200 when all were stored, 202 when some, 409 when none. A wrong content
type: 415; no boundary, or no part at all: 400; a body beyond `DicomwebConfig.stow_max_bytes`
(by its Content-Length before anything is read, or as it streams): 413, and the instances
of the parts before it stay stored, as those acknowledged on an aborted association do. At
most one part is held in memory."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pynetdicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from kaapana_assets.dicomweb import multipart
from kaapana_assets.dicomweb.config import DicomwebConfig
from kaapana_assets.dicomweb.http import DICOM_JSON, DicomJSONResponse, require_uid
from kaapana_assets.dicomweb.wado import base_url
from kaapana_assets.ingest.headers import InstanceHeader, Reason
from kaapana_assets.network.intake import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    SUCCESS,
    Announced,
    Arrival,
    Refusal,
    admit,
)
from kaapana_assets.network.journal import ReceiveJournal
from kaapana_assets.network.receiver import DIMSE_TIMEOUT_S
from kaapana_assets.network.spool_writer import PREAMBLE, file_meta_bytes, part10_bytes
from kaapana_assets.projects.catalog import UnknownProject, require_project
from kaapana_assets.projects.membership import ProjectNameError
from kaapana_assets.projects.routing import STOW_RS_SENDER

log = logging.getLogger("kaapana.stow")

DICOM = "application/dicom"
SENDER = STOW_RS_SENDER  # the Sending Application Entity Title we record, and the spool folder
RECEIVER = "DICOMWEB"  # the Receiving Application Entity Title
STUDY_MISMATCH = "study_mismatch"
MAX_PART_BYTES = 2**30  # one instance is held in memory while it is checked
SPOOL_WAIT_S = DIMSE_TIMEOUT_S  # the receiver's bound on waiting for the spool writer


# --- a part as a Part 10 file --------------------------------------------------------------


def _file_meta(part: bytes) -> tuple[dict[int, bytes], int] | Refusal:
    """The file meta group's values by element number, and where the data set starts; the
    group is Explicit VR Little Endian by definition (PS3.10 7.1)."""
    if len(part) < 132 or part[128:132] != b"DICM":
        return Refusal(Reason.NO_FILE_META, "not a DICOM Part 10 file (no preamble and DICM prefix)",
                       CANNOT_UNDERSTAND)
    values: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(part):
        group, element = struct.unpack_from("<HH", part, offset)
        if group != 0x0002:
            break
        vr = part[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            if offset + 12 > len(part):
                break
            length = struct.unpack_from("<I", part, offset + 8)[0]
            start = offset + 12
        else:
            length = struct.unpack_from("<H", part, offset + 6)[0]
            start = offset + 8
        if length == 0xFFFFFFFF or start + length > len(part):
            return Refusal(Reason.NO_FILE_META, "the file meta group runs past the part's end", CANNOT_UNDERSTAND)
        values[element] = part[start:start + length]
        offset = start + length
    if 0x0010 not in values:
        return Refusal(Reason.NO_FILE_META, "no Transfer Syntax UID in the file meta", CANNOT_UNDERSTAND)
    return values, offset


def _text(value: bytes | None) -> str:
    return (value or b"").rstrip(b"\x00 ").decode("ascii", "replace").strip()


def arrival(part: bytes, address: str, project: str | None = None) -> Arrival | Refusal:
    """The part as the intake takes it: its data set after a file meta group of ours."""
    meta = _file_meta(part)
    if isinstance(meta, Refusal):
        return meta
    values, start = meta
    sop_class, sop_instance, syntax = _text(values.get(0x0002)), _text(values.get(0x0003)), _text(values[0x0010])
    encoded = memoryview(part)[start:]
    header = file_meta_bytes(sop_class, sop_instance, syntax, pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
                             pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION, SENDER, RECEIVER)
    if header is not None:
        data = b"".join((PREAMBLE, header, encoded))
    else:  # unusual UIDs: pydicom encodes (and validates) the file meta
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = UID(sop_class)
        file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
        file_meta.TransferSyntaxUID = UID(syntax)
        file_meta.ImplementationClassUID = UID(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID)
        file_meta.ImplementationVersionName = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION
        file_meta.SendingApplicationEntityTitle = SENDER
        file_meta.ReceivingApplicationEntityTitle = RECEIVER
        try:
            data = part10_bytes(file_meta, encoded)
        except (ValueError, TypeError) as exc:
            return Refusal(Reason.NO_FILE_META, f"file meta that cannot be written: {exc}", CANNOT_UNDERSTAND)
    announced = Announced(sop_instance, sop_class, "part's file meta", "MediaStorageSOPInstanceUID",
                          "MediaStorageSOPClassUID")
    return Arrival(data, encoded, syntax, announced, SENDER, address, project)


# --- the service ---------------------------------------------------------------------------


def _item(sop_class: str, sop_instance: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


class Stow:
    def __init__(self, config: DicomwebConfig) -> None:
        self.config = config
        self.journal: ReceiveJournal | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Take a journal segment in the spool (replaying any a crashed writer left)."""
        with self._lock:
            if self.journal is None:
                self.config.incoming.mkdir(parents=True, exist_ok=True)
                journal = ReceiveJournal(self.config.incoming, async_spool=True)
                journal.open()
                self.journal = journal

    def close(self) -> None:
        with self._lock:
            if self.journal is not None:
                self.journal.close()
                self.journal = None

    @contextmanager
    def opened(self) -> Iterator[Stow]:
        self.open()
        try:
            yield self
        finally:
            self.close()

    async def store(self, request: Request) -> Response:
        study_uid = require_uid(str(request.path_params["study"]), "StudyInstanceUID") \
            if "study" in request.path_params else None
        project = self._project(request)
        boundary = self._boundary(request)
        limit = self.config.stow_max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the body ({declared} bytes) exceeds the limit of {limit} bytes")
        self.open()
        address = request.client.host if request.client else "unknown"
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        base = base_url(request)
        try:
            async for part in multipart.read_parts(request.stream(), boundary, limit, min(limit, MAX_PART_BYTES)):
                item, status, header = await run_in_threadpool(self._admit, part, address, study_uid, project)
                if status == SUCCESS and header is not None:
                    item["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{header.study_uid}/series/"
                                                              f"{header.series_uid}/instances/{header.sop_instance_uid}"]}
                    stored.append(item)
                else:
                    item["00081197"] = {"vr": "US", "Value": [status]}
                    failed.append(item)
        except multipart.BodyTooLarge as exc:
            raise HTTPException(413, f"{exc}; {len(stored)} instance(s) of the parts before it were stored") from None
        except multipart.MalformedBody as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        if stored:
            # as the receiver holds an association's release: the spool files written (bounded;
            # the instances are durable in the journal whatever happens to their files)
            journal = self.journal
            if journal is not None:
                await run_in_threadpool(journal.wait_written, SPOOL_WAIT_S)
        if not stored and not failed:
            raise HTTPException(400, "the body holds no part")
        answer: dict[str, Any] = {}
        if study_uid is not None:
            answer["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study_uid}"]}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if stored else 409
        return DicomJSONResponse(answer, status_code=status, media_type=DICOM_JSON)

    def _project(self, request: Request) -> str | None:
        """The project of `/projects/{project}/studies`: checked before any part is read, so an
        unknown one stores nothing (the client still holds its data; the receiver, which reads
        no lake, lets the ingest put such series in the default project instead)."""
        if "project" not in request.path_params:
            return None
        try:
            return require_project(self.config.lake, str(request.path_params["project"]))
        except ProjectNameError as exc:
            raise HTTPException(400, str(exc)) from None
        except UnknownProject as exc:
            raise HTTPException(404, str(exc)) from None

    @staticmethod
    def _boundary(request: Request) -> str:
        header = request.headers.get("content-type", "")
        media_type, *raw = (p.strip() for p in header.split(";"))
        params = {}
        for p in raw:
            name, _, value = p.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        if media_type.lower() != multipart.MULTIPART or params.get("type", DICOM).lower() != DICOM:
            raise HTTPException(415, f"Content-Type {header[:200]!r}: STOW-RS here takes multipart/related; "
                                     f'type="{DICOM}"')
        boundary = params.get("boundary")
        if not boundary:
            raise HTTPException(400, f"Content-Type {header[:200]!r}: no boundary")
        return boundary

    def _admit(self, part: multipart.ReceivedPart, address: str, study_uid: str | None, project: str | None = None
               ) -> tuple[dict[str, Any], int, InstanceHeader | None]:
        """The response item of one part, its DICOM status, and the header of what was stored."""
        assert self.journal is not None
        part_type = part.content_type.split(";")[0].strip().lower()
        if part_type not in ("", "application/dicom"):
            log.warning("refused a part of type %s from %s at %s; answered 0x%04X, nothing stored", part_type[:80],
                        SENDER, address, CANNOT_UNDERSTAND)
            return {}, CANNOT_UNDERSTAND, None
        made = arrival(part.body, address, project)
        if isinstance(made, Refusal):
            log.warning("refused a part from %s at %s: %s: %s; answered 0x%04X, nothing stored", SENDER, address,
                        made.reason, made.message, made.status)
            return {}, made.status, None

        def same_study(header: InstanceHeader) -> Refusal | None:
            if study_uid is None or header.study_uid == study_uid:
                return None
            return Refusal(STUDY_MISMATCH, f"StudyInstanceUID {header.study_uid} differs from the request's study "
                                           f"{study_uid}", DATA_SET_DOES_NOT_MATCH_SOP_CLASS)

        outcome = admit(made, self.journal, log, same_study)
        return _item(made.announced.sop_class_uid, made.announced.sop_instance_uid), outcome.status, outcome.header


def routes(config: DicomwebConfig, stow: Stow | None = None) -> list[BaseRoute]:
    service = stow or Stow(config)
    # /projects/{project}/…: the instances go into that project (as Kaapana's per-project STOW-RS).
    return [Route(path, service.store, methods=["POST"])
            for path in ("/studies", "/studies/{study}", "/projects/{project}/studies",
                         "/projects/{project}/studies/{study}")]

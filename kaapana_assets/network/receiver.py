"""`kaapana receive`: a pynetdicom Storage SCP writing every received instance durably
into the spool that the incoming_studies sensor watches.

What is stored
- All storage SOP classes (SEG included) in every transfer syntax (compressed ones too),
  and Verification, are accepted. The data set is stored byte for byte as it arrived, after
  a DICOM Part 10 preamble and file meta.
- A C-STORE is acknowledged only after the instance is durable: appended to the receive
  journal and flushed (`network/journal.py`; the spool file itself is made durable by the
  journal's next checkpoint, within a second, and replayed from the journal after a crash).
- The calling and called AE titles go into the file meta as (0002,0017) Sending and
  (0002,0018) Receiving Application Entity Title, and from there into the `instances`
  table. (Files written before this carry the calling AE title in (0002,0016), which the
  ingest still reads as a fallback.)
- An optional allow-list of calling AE titles; anyone else is refused.
- The called AE title names the research project (`KP-<PROJECT>`, or an explicit mapping:
  `projects/routing.py`): the instance waits in `<spool>/projects/<project>/<calling AE>/`,
  and the ingest assigns its series to that project. Any other called AE title: the plain
  spool, `<spool>/<calling AE>/` (the default project).

What is refused (`network/intake.py` `admit`, which STOW-RS shares; nothing reaches the
spool; the peer gets a failure status; a `refused ...` line names the SOP Instance UID,
calling AE title, address and reason)
- Data sets that the ingest's own parser (`parse_header`) cannot read: empty, garbage
  (nothing identifying an instance can be read), malformed, truncated, or more work than a
  file may cost (a deflated data set inflating beyond `headers.MAX_INFLATED_BYTES`: an
  inflation bomb is measured streaming, in 1 MiB steps, never held in memory)
  → 0xC210 "Cannot Understand".
- Readable data sets that we could not index: missing required attributes, invalid UIDs,
  an unsupported transfer syntax or no installed codec for the pixels, or a
  SOPInstanceUID/SOPClassUID that differs from the C-STORE request's
  AffectedSOPInstanceUID/AffectedSOPClassUID → 0xA900 "Data Set Does Not Match SOP Class".
- A file that cannot be written (disk full...) → 0xA700 "Out of Resources".

Abuse resistance (pynetdicom settings, chosen deliberately; `kaapana receive --help`)
- ACSE timeout 30 s: a connection that sends no A-ASSOCIATE-RQ is dropped after 30 s.
- DIMSE timeout 30 s: the longest wait for a DIMSE message within an operation.
- Network (idle) timeout 60 s, configurable: an association silent that long is aborted.
- At most 256 concurrent associations in all and 16 per peer IP address, both configurable,
  counted once over all worker processes of `kaapana receive` (`network/limits.py`);
  connections still negotiating count. They are enforced when the TCP connection is
  accepted, before any thread serves it (`ReceiverServer.verify_request`): an excess
  connection gets an A-ASSOCIATE-RJ (transient, local limit exceeded), is closed, and the
  refusal is logged. One caller hoarding idle associations cannot starve the others.
- Deflated data sets are inflated by one association at a time (a legitimate one may
  inflate to 256 MiB; sixteen at once would not fit in memory).
- TCP_NODELAY on every connection (Nagle + delayed ACK cap storescu at ~20 instances/s).
Not bounded: the size of one (non-deflated) data set, which pynetdicom assembles in memory.

Speed (bench/receive.py, whose *floor* is pynetdicom alone: on a 2-core machine about half of
a C-STORE's CPU is pynetdicom's, the rest our header check, journal and spool file)
- Event-driven reactors: pynetdicom 3.0 polls with 1 ms sleeps in two threads per
  association; ours wait on the socket and on queue wake-ups (`pynetdicom_internals.py`:
  pynetdicom's code otherwise, used only with pynetdicom 3.0.x).
- Up to 1 MiB PDUs (`MAX_PDU_SIZE`): one PDU per CT slice instead of three or more.
- The file meta and the C-STORE response are encoded directly (byte for byte what pydicom
  and pynetdicom produce, tested) instead of through pydicom Datasets; pynetdicom's
  per-PDU/per-message INFO/DEBUG handlers are not bound (its logger stays at WARNING).
- One flush of data blocks per instance before the acknowledgement (the receive journal's
  `fdatasync` of blocks that already exist) instead of two filesystem commits (fsync of the
  file, then of its folder after the rename), and the spool file written by the journal's
  writer thread while the next C-STORE arrives: 1.4–1.9× the throughput on one
  association. Parallel associations share their flushes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from kaapana_assets.network.intake import Announced, Arrival, admit
from kaapana_assets.network.intake import inflates_beyond as inflates_beyond  # where the tests look for it
from kaapana_assets.network.journal import CHECKPOINT_S, ReceiveJournal
from kaapana_assets.network.limits import AssociationLimits, Limit
from kaapana_assets.network.pynetdicom_internals import EVENT_DRIVEN, EventAssociation, event_driven
from kaapana_assets.network.spool_writer import (
    PREAMBLE,
    file_meta_bytes,
    part10_bytes,
)
from kaapana_assets.projects.routing import AeTitleRouting

log = logging.getLogger("kaapana.receiver")

# Defaults of `kaapana receive` (see the module docstring).
ACSE_TIMEOUT_S = 30.0
DIMSE_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0
MAX_ASSOCIATIONS = 256
MAX_PER_CALLER = 16
# Largest P-DATA PDU we accept (pynetdicom's default is 16 KiB): a CT slice arrives in one
# PDU instead of three or more, and every PDU costs a pass through pynetdicom's reactor
# (≈0.4 ms of CPU per instance saved). A peer may send smaller ones.
MAX_PDU_SIZE = 2**20
# How often a worker busier than another looks whether it is its turn to accept again.
TURN_WAIT_S = 0.005

# A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): type 0x03, length 4; result 2 rejected-transient,
# source 3 service-provider (presentation), reason 2 local-limit-exceeded.
ASSOCIATE_RJ_LOCAL_LIMIT = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])

def _nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _called_ae_title(assoc: Association) -> str:
    """The AE title the peer called, as its A-ASSOCIATE-RQ names it: any title is accepted, and
    it names the project (KP-<PROJECT>). `acceptor.ae_title` is only our own title."""
    request = getattr(assoc.requestor, "primitive", None)
    called = getattr(request, "called_ae_title", None)
    return str(called or assoc.acceptor.ae_title).strip()


def _store(event: evt.Event, journal: ReceiveJournal, routing: AeTitleRouting) -> int:
    calling = event.assoc.requestor.ae_title.strip()
    called = _called_ae_title(event.assoc)
    request = cast(C_STORE, event.request)  # the EVT_C_STORE handler: always a C-STORE request
    announced = Announced(str(request.AffectedSOPInstanceUID or ""), str(request.AffectedSOPClassUID or ""))
    transfer_syntax = str(event.context.transfer_syntax)
    meta = file_meta_bytes(announced.sop_class_uid, announced.sop_instance_uid, transfer_syntax,
                           pynetdicom.PYNETDICOM_IMPLEMENTATION_UID, pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
                           calling, called)
    stream = request.DataSet  # None when the request declared no data set at all
    with (stream.getbuffer() if stream is not None else memoryview(b"")) as encoded:
        if meta is not None:
            data = b"".join((PREAMBLE, meta, encoded))  # the data set exactly as it arrived
        else:  # unusual UIDs or AE titles: pydicom encodes the file meta
            file_meta = event.file_meta
            file_meta.SendingApplicationEntityTitle = calling
            file_meta.ReceivingApplicationEntityTitle = called
            data = part10_bytes(file_meta, encoded)
        arrival = Arrival(data, encoded, transfer_syntax, announced, calling, str(event.assoc.requestor.address),
                          routing.project_of(called))
        return admit(arrival, journal, log).status


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


def _accepted(event: evt.Event) -> None:
    """One line per association (the log format names the worker process that serves it)."""
    requestor = event.assoc.requestor
    log.info("association from %s at %s:%s accepted", requestor.ae_title.strip(), requestor.address, requestor.port)


def _aborted(event: evt.Event) -> None:
    log.warning("association from %s at %s aborted; instances not completely received were not stored",
                event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address)


class _CountingRequestHandler(RequestHandler):
    """pynetdicom's handler (create the association, EVT_CONN_OPEN, start it); then it waits
    for the association to end and stops counting it in the limits (counted since accept)."""

    server: ReceiverServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if not EVENT_DRIVEN:
            return assoc
        made = cast(EventAssociation, event_driven(assoc))
        journal = self.server.journal
        if journal is not None:
            # Bounded: the instances are durable in the journal whatever happens to their files.
            made.before_release = lambda: journal.wait_written(DIMSE_TIMEOUT_S)
        return made

    def handle(self) -> None:
        try:
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            self.server.limits.release(str(self.client_address[0]))


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the association limits (`network/limits.py`: per peer
    IP address and in all, shared by every worker process) enforced on accept, in the serving
    thread, before any thread is started. Given a `listening` socket (a worker of `kaapana
    receive`: bound and listening in the supervisor, inherited), it serves that socket
    instead of binding one, and leaves it as it is for the other workers when it stops."""

    request_queue_size = 128  # listen backlog (socketserver's default is 5)
    daemon_threads = True
    journal: ReceiveJournal | None = None

    def __init__(self, *args: Any, limits: AssociationLimits | None = None, listening: socket.socket | None = None,
                 **kwargs: Any) -> None:
        self.limits = limits if limits is not None else AssociationLimits(MAX_PER_CALLER, MAX_ASSOCIATIONS)
        self.listening = listening
        kwargs.setdefault("request_handler", _CountingRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.listening is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()  # the one socketserver made: the inherited one is served instead
        # Left blocking, without a timeout: every worker waits in accept() and the kernel
        # hands each connection to one of those waiting.
        self.socket = self.listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listening is None:
            super().server_activate()

    def server_close(self) -> None:
        if self.listening is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()  # only this process's descriptor: shutdown() would stop every worker's accept

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        refused = self.limits.acquire(host)
        if refused is None:
            return True
        if refused.limit is Limit.PER_CALLER:
            log.warning("refused association from %s: it holds %d concurrent associations (limit %d per address)",
                        host, refused.busy, refused.allowed)
        else:
            log.warning("refused association from %s: %d concurrent associations in all (limit %d)",
                        host, refused.busy, refused.allowed)
        _reject_connection(request)
        return False  # socketserver closes the connection

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # a thread runs the request handler
        except RuntimeError:  # no thread could be started
            self.limits.release(str(client_address[0]))
            self.shutdown_request(request)
            raise

    def accept_forever(self) -> None:
        """Serve the inherited listening socket: wait in accept() (blocking, in the kernel's
        queue of waiters) whenever no other worker is less busy, check the limits, hand the
        connection to a thread; until an exception (the worker's stop signal) or the socket
        is closed."""
        self.limits.accepting()
        while True:
            while not self.limits.my_turn():
                time.sleep(TURN_WAIT_S)
            try:
                request, client_address = self.get_request()
            except OSError:
                if self.socket is None or self.socket.fileno() < 0:
                    return  # closed
                continue  # the peer gave up before we accepted (ECONNABORTED...)
            if self.verify_request(request, client_address):
                try:
                    self.process_request(request, client_address)
                except Exception:
                    self.handle_error(request, client_address)
                    self.shutdown_request(request)
            else:
                self.shutdown_request(request)


def _reject_connection(sock: socket.socket) -> None:
    """Best effort, never blocking: answer A-ASSOCIATE-RJ (transient, local limit
    exceeded) and drain what the peer sent, so that closing does not reset the answer."""
    try:
        sock.setblocking(False)
        sock.send(ASSOCIATE_RJ_LOCAL_LIMIT)
        while sock.recv(65536):
            pass
    except OSError:  # BlockingIOError included: nothing (more) to read
        pass


def build_receiver(
    ae_title: str = "KAAPANA",
    allowed_calling: Sequence[str] | None = None,
    *,
    acse_timeout: float = ACSE_TIMEOUT_S,
    dimse_timeout: float = DIMSE_TIMEOUT_S,
    idle_timeout: float = IDLE_TIMEOUT_S,
    max_associations: int = MAX_ASSOCIATIONS,
) -> AE:
    ae = AE(ae_title=ae_title)
    transfer_syntaxes = list(AllTransferSyntaxes)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, transfer_syntaxes)
    ae.add_supported_context(Verification)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = idle_timeout
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.maximum_associations = max_associations
    if allowed_calling:
        ae.require_calling_aet = list(allowed_calling)
    return ae


@dataclass(frozen=True)
class ReceiverSettings:
    """What `kaapana receive` is told (see the module docstring and `kaapana receive --help`)."""

    spool: Path
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "KAAPANA"
    allowed_calling: tuple[str, ...] = ()
    acse_timeout: float = ACSE_TIMEOUT_S
    dimse_timeout: float = DIMSE_TIMEOUT_S
    idle_timeout: float = IDLE_TIMEOUT_S
    max_associations: int = MAX_ASSOCIATIONS
    max_per_caller: int = MAX_PER_CALLER
    checkpoint_s: float = CHECKPOINT_S
    routing: AeTitleRouting = field(default_factory=AeTitleRouting)  # called AE title → project spool folder

    def limits(self, workers: int = 1) -> AssociationLimits:
        return AssociationLimits(self.max_per_caller, self.max_associations, workers)


def make_receiver(settings: ReceiverSettings, *, limits: AssociationLimits | None = None,
                  listening: socket.socket | None = None) -> ReceiverServer:
    """The SCP's server, not yet serving: the receive journal is open (what a crashed
    receiver acknowledged but the machine did not keep is written back first), the socket
    bound (or the inherited `listening` one taken)."""
    if settings.max_per_caller < 1:
        raise ValueError("max_per_caller must be at least 1")
    # Spool files written after the acknowledgement only where our reactor can hold an
    # association's release until they are there (pynetdicom 3.0.x).
    journal = ReceiveJournal(settings.spool, checkpoint_s=settings.checkpoint_s, async_spool=EVENT_DRIVEN)
    journal.open()
    allowed = set(settings.allowed_calling) or None
    ae = build_receiver(settings.ae_title, settings.allowed_calling or None, acse_timeout=settings.acse_timeout,
                        dimse_timeout=settings.dimse_timeout, idle_timeout=settings.idle_timeout,
                        max_associations=settings.max_associations)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, _nodelay),
        (evt.EVT_ACSE_RECV, _acse_received, [allowed]),
        (evt.EVT_C_STORE, _store, [journal, settings.routing]),
        (evt.EVT_ACCEPTED, _accepted),
        (evt.EVT_ABORTED, _aborted),
    ]
    # As AE.start_server(block=False) does, but with our server class, so that the
    # limits hold from the first connection on.
    try:
        server = cast(ReceiverServer, ae.make_server(
            (settings.host, settings.port), evt_handlers=handlers, server_class=ReceiverServer,
            limits=limits if limits is not None else settings.limits(), listening=listening))
    except BaseException:
        journal.close()
        raise
    server.journal = journal
    return server


def start_receiver(
    spool: Path,
    host: str = "127.0.0.1",
    port: int = 11112,
    ae_title: str = "KAAPANA",
    allowed_calling: Sequence[str] | None = None,
    block: bool = False,
    *,
    acse_timeout: float = ACSE_TIMEOUT_S,
    dimse_timeout: float = DIMSE_TIMEOUT_S,
    idle_timeout: float = IDLE_TIMEOUT_S,
    max_associations: int = MAX_ASSOCIATIONS,
    max_per_caller: int = MAX_PER_CALLER,
    checkpoint_s: float = CHECKPOINT_S,
    routing: AeTitleRouting | None = None,
) -> ReceiverServer | None:
    """Start the SCP in this process (`kaapana receive` runs it in worker processes:
    `network/workers.py`). Non-blocking returns the server (stop it with `stop_receiver`);
    blocking serves until KeyboardInterrupt."""
    settings = ReceiverSettings(spool, host, port, ae_title, tuple(allowed_calling or ()), acse_timeout,
                                dimse_timeout, idle_timeout, max_associations, max_per_caller, checkpoint_s,
                                routing or AeTitleRouting())
    server = make_receiver(settings)
    log_start(settings)
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{host}:{port}", daemon=True)
    thread.start()
    server.ae._servers.append(server)  # AssociationServer.shutdown() removes itself from there
    if not block:
        return server
    try:
        while thread.is_alive():
            thread.join(0.5)  # a timed wait lets KeyboardInterrupt through
    except KeyboardInterrupt:
        pass
    finally:
        stop_receiver(server)
    return None


def log_start(settings: ReceiverSettings, workers: int = 1) -> None:
    allowed = sorted(settings.allowed_calling)
    log.info("receiving as %s on %s:%d into %s%s%s", settings.ae_title, settings.host, settings.port, settings.spool,
             f" (allowed: {', '.join(allowed)})" if allowed else "", f" with {workers} workers" if workers > 1 else "")
    log.info("limits: %d associations, %d per address; timeouts: ACSE %gs, DIMSE %gs, idle %gs",
             settings.max_associations, settings.max_per_caller, settings.acse_timeout, settings.dimse_timeout,
             settings.idle_timeout)


def stop_receiver(server: ReceiverServer) -> None:
    """Abort running associations (a stalled peer must not hold up shutdown), then stop."""
    for assoc in list(server.active_associations):
        assoc.abort()
    if server.listening is None:
        server.shutdown()  # ends serve_forever, closes the socket
    else:
        server.server_close()  # a worker: the listening socket stays open for the others
    if server.journal is not None:
        server.journal.close()  # a last checkpoint: every acknowledged instance durable in the spool

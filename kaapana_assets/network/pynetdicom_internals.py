"""The receiver's use of pynetdicom's private internals, in one place.

Copied from and written against pynetdicom 3.0.4 (`PYNETDICOM_VERSION`; pyproject.toml pins
exactly that version). tests/network/test_pynetdicom_internals.py fails when another version is
installed, or when a private name listed in `RELIES_ON` is gone: then re-read what is listed
below against the new version's pynetdicom/association.py, dul.py, dimse.py and transport.py,
bring this module (and receiver.py's `_CountingRequestHandler`, `ReceiverServer`) up to date,
and move the pin and `PYNETDICOM_VERSION` together.

What it overrides (used only while EVENT_DRIVEN: pynetdicom 3.0.x; any other version runs
pynetdicom's own reactors and DIMSE provider):
- `Association._run_reactor`: a copy of pynetdicom 3.0.4's acceptor reactor loop, its 1 ms
  sleep replaced by a wait on a wake-up event, plus a `before_release` hook (the receiver
  holds a release until the spool files are written). `Association.kill` also sets the event.
- `DULServiceProvider`: `_run_loop_delay` (a property: no nap in the reactor thread),
  `_process_recv_primitive` (waits in select() on the socket and a wake-up socket pair first),
  `kill_dul`, `stop_dul`, `run_reactor`; its `event_queue`, `to_provider_queue` and
  `to_user_queue` replaced by queues that wake the reactor on every put.
- `DIMSEServiceProvider.send_msg`: plain C-STORE responses encoded directly
  (`store_response_command`, byte for byte what pynetdicom encodes; tested); its `msg_queue`
  replaced by a waking queue.
- An association made by pynetdicom's request handler gets these classes by assignment to
  `__class__` (`event_driven`), before it starts: it takes over the unused DUL's socket,
  timers (`artim_timer`, `_idle_timer`) and queued events, and pynetdicom's standard
  per-PDU/per-DIMSE log handlers (`pynetdicom._handlers`) are unbound.

Why: pynetdicom polls: its DUL thread sleeps 1 ms whenever the socket is quiet and the
association thread sleeps 1 ms per loop, so every C-STORE waits for three such naps (PDUs in,
the request to the handler, the response out) — about 3–5 ms per instance on a loaded machine,
more than everything else together. These subclasses wait on the socket and on queue wake-ups
instead; everything else is pynetdicom's own code (docs/decisions/0010)."""

from __future__ import annotations

import logging
import queue
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

PYNETDICOM_VERSION = "3.0.4"  # the version this module was copied from and checked against

# The private names this module and receiver.py take from pynetdicom (attributes of instances
# of these classes, set in their __init__ or defined on the class): the test checks each one
# exists in the installed pynetdicom.
RELIES_ON: dict[str, tuple[str, ...]] = {
    "association.Association": (
        "_run_reactor", "_serve_request", "_kill", "_is_paused", "_reactor_checkpoint", "kill", "abort", "release",
        "acse", "dimse", "dul", "is_established", "is_released", "is_aborted", "network_timeout_response",
        "unbind", "get_handlers",
    ),
    "dul.DULServiceProvider": (
        "_run_loop_delay", "_process_recv_primitive", "_kill_thread", "_idle_timer", "artim_timer", "state_machine",
        "socket", "event_queue", "to_provider_queue", "to_user_queue", "kill_dul", "stop_dul", "run_reactor",
        "idle_timer_expired", "receive_pdu", "send_pdu", "is_alive",
    ),
    "dimse.DIMSEServiceProvider": ("send_msg", "get_msg", "msg_queue", "maximum_pdu_size", "dul", "assoc"),
    "acse.ACSE": ("is_release_requested", "is_aborted", "send_release"),
    "transport.AssociationSocket": ("_is_connected", "socket"),
    "timer.Timer": ("remaining",),
    # receiver.py: its request handler and server
    "transport.RequestHandler": ("_create_association", "handle"),
    "ae.ApplicationEntity": ("_servers", "make_server"),
}

pynetdicom_log = logging.getLogger("pynetdicom.association")  # where pynetdicom's reactor logs

EVENT_DRIVEN = pynetdicom.__version__.startswith("3.0.")  # the reactors below are pynetdicom 3.0's
_STANDARD_LOG_HANDLERS = [
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler), (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
]
_WAIT_S = 0.05  # longest wait without a wake-up: ARTIM, idle timer and kill checks run this often


class _WakingQueue(queue.Queue):
    """A queue that calls `wake` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _EventDUL(DULServiceProvider):
    """The DUL reactor blocks in select() on its socket and a wake-up socket pair until
    there is something to read, send or do, instead of sleeping 1 ms per idle loop."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        self._waiting = False
        self.event_queue = _WakingQueue(self._wake_up)
        self.to_provider_queue = _WakingQueue(self._wake_up)
        self.to_user_queue = _WakingQueue(assoc._wake.set)  # type: ignore[attr-defined]

    @property
    def _run_loop_delay(self) -> float:
        # The reactor's own nap becomes a mere yield (it waits in select instead); others
        # (stop_dul waiting for the thread to end) keep pynetdicom's 1 ms.
        return 0.0 if threading.current_thread() is self else 0.001

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        pass

    def _wake_up(self) -> None:
        # Only a reactor waiting in select() needs the byte (it sets `_waiting` before it
        # looks at the queues a last time, so a put seen as not waiting is seen by it).
        if self._waiting and threading.current_thread() is not self:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # buffer full (a wake-up is pending anyway) or closed
                pass

    def _process_recv_primitive(self) -> bool:
        self._wait_for_work()
        return super()._process_recv_primitive()

    def _wait_for_work(self) -> None:
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if raw is None or not getattr(sock, "_is_connected", False) or self.state_machine.current_state == "Sta13":
            if not (self._kill_thread or self.event_queue.queue or self.to_provider_queue.queue):
                time.sleep(0.001)  # closing or closed: pynetdicom's own polling, no busy loop
            return
        self._waiting = True
        try:
            if self._kill_thread or self.event_queue.queue or self.to_provider_queue.queue:
                return
            timeout = max(0.0, min(_WAIT_S, self.artim_timer.remaining))
            readable, _, _ = select.select([raw, self._wake_r], [], [], timeout)
        except (OSError, ValueError):  # the socket was closed under us: pynetdicom finds out
            return
        finally:
            self._waiting = False
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:  # BlockingIOError: drained
                pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake_up()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake_up()
        return super().stop_dul()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self.assoc._wake.set()  # type: ignore[attr-defined]  # the association notices the end
            self._wake_r.close()
            self._wake_w.close()


class EventAssociation(Association):
    """An acceptor association whose reactor waits for DIMSE messages and ACSE primitives
    (a threading.Event set on every put) instead of sleeping 1 ms per loop. Made from the
    association pynetdicom's request handler creates (`_event_driven`), before it starts."""

    _wake: threading.Event
    before_release: Callable[[], object] | None = None

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _run_reactor(self) -> None:  # pynetdicom 3.0.4's, with the sleep replaced by a wait
        self._is_paused = False
        while not self._kill:
            if not self.dimse.msg_queue.queue:
                self._wake.wait(_WAIT_S)
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                if self.before_release is not None:
                    self.before_release()  # what the peer sent is in the spool when it sees the release
                self.acse.send_release(is_response=True)
                pynetdicom_log.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                pynetdicom_log.info(log_msg)
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                pynetdicom_log.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def store_response_command(primitive: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set exactly as pynetdicom encodes it (implicit VR little
    endian; tested byte for byte), built directly: pynetdicom goes through a pydicom
    Dataset, encoded twice (≈40 % of the receiver's CPU per instance). None for anything
    but a plain response (error comment, offending element, unusual UIDs): pynetdicom
    encodes those."""
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    if not (isinstance(sop_class, str) and _COMMAND_UID.fullmatch(sop_class)
            and isinstance(sop_instance, str) and _COMMAND_UID.fullmatch(sop_instance)
            and isinstance(message_id, int) and isinstance(status, int)):
        return None

    def uid(element: int, value: str) -> bytes:
        encoded = value.encode("ascii")
        encoded += b"\0" * (len(encoded) % 2)
        return struct.pack("<HHI", 0x0000, element, len(encoded)) + encoded

    def us(element: int, value: int) -> bytes:
        return struct.pack("<HHIH", 0x0000, element, 2, value)

    body = b"".join((uid(0x0002, sop_class), us(0x0100, 0x8001), us(0x0120, message_id), us(0x0800, 0x0101),
                     us(0x0900, status), uid(0x1000, sop_instance)))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


_COMMAND_UID = re.compile(r"[0-9.]{1,64}")


class _FastStoreResponseDIMSE(DIMSEServiceProvider):
    """Sends plain C-STORE responses with `store_response_command`; all else as pynetdicom."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = None
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
                and (self.maximum_pdu_size == 0 or self.maximum_pdu_size >= 200)):
            command = store_response_command(primitive)
        if command is None:
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command, last fragment
        self.dul.send_pdu(pdata)


def event_driven(assoc: Association) -> Association:
    """Turn a not yet started acceptor association into an `EventAssociation`: its own
    wake-up event, an event-driven DUL (taking over the unused one's socket, timers and
    queued events) and a waking DIMSE message queue."""
    assoc._wake = threading.Event()  # type: ignore[attr-defined]
    assoc.__class__ = EventAssociation
    unused = assoc.dul
    assoc.dul = _EventDUL(assoc)
    assoc.dul.socket = unused.socket
    # The association set its ACSE and network timeouts on the unused DUL's timers.
    assoc.dul.artim_timer, assoc.dul._idle_timer = unused.artim_timer, unused._idle_timer
    for name in ("event_queue", "to_provider_queue", "to_user_queue"):  # Evt5 (connection open) is there
        for item in getattr(unused, name).queue:
            getattr(assoc.dul, name).put(item)
    assoc.dimse.__class__ = _FastStoreResponseDIMSE
    assoc.dimse.msg_queue = _WakingQueue(assoc._wake.set)  # type: ignore[attr-defined]
    # pynetdicom's standard handlers format INFO/DEBUG lines per PDU and per DIMSE message,
    # for a logger `kaapana receive` keeps at WARNING: ≈0.3 ms of CPU per instance.
    for event, handler in _STANDARD_LOG_HANDLERS:
        assoc.unbind(event, handler)
    return assoc



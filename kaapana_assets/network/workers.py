"""`kaapana receive --workers N`: the receiver on every core.

One Python process stays near one core (pynetdicom and our checks share one interpreter
lock), so the receiver runs as N worker processes behind one port:

- The supervisor (this module's `supervise`) binds and listens once, then forks the workers;
  each inherits the listening socket and waits in a blocking `accept()` on it. The kernel
  hands each new connection to one process waiting in accept (not by a hash of addresses,
  as SO_REUSEPORT would), and a worker waits there only while it serves no more associations
  than the least busy one (`AssociationLimits.my_turn`): a burst of connections spreads too.
- Each worker is a complete receiver (`receiver.make_receiver`): its own receive journal
  segment (flock'd), its own threads per association, every check and guarantee of the
  single-process receiver per instance (durable before the acknowledgement, refusals,
  timeouts).
- The association limits (per peer address and in all) are one table shared by all workers
  (`network/limits.py`), so N workers admit no more than one receiver would.
- A worker that dies (killed, crashed) is replaced: the supervisor clears its counts in the
  table and forks a new worker for the same slot, which opens the journal — replaying the
  dead worker's segment, now unlocked, into the spool — before it accepts. Meanwhile the
  other workers go on accepting.
- SIGTERM or SIGINT to the supervisor stops it cleanly: it sends SIGTERM to each worker by
  PID (each aborts its associations and closes its journal: every acknowledged instance
  durable in the spool) and waits for them. A worker whose supervisor is gone stops itself.

Workers are forked, not spawned: they start in milliseconds with everything imported, and the
supervisor never starts a thread, so nothing is copied mid-operation."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from types import FrameType

from kaapana_assets.network.limits import AssociationLimits
from kaapana_assets.network.receiver import ReceiverSettings, log_start, make_receiver, stop_receiver

log = logging.getLogger("kaapana.receiver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
COULD_NOT_START = 3  # a worker's exit status when it could not open the journal or the server
STOP_GRACE_S = 30.0  # how long the supervisor waits for its workers to stop before SIGKILL
_ORPHAN_CHECK_S = 1.0


class _Stopping(Exception):
    """Raised in a worker's main thread by its stop signal."""


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """The listening socket that every worker inherits (blocking: no timeout on it, ever)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # once: the cleanup that follows is not interrupted
    raise _Stopping(signal.Signals(signum).name)


def _watch_supervisor(supervisor: int) -> None:
    while os.getppid() == supervisor:
        time.sleep(_ORPHAN_CHECK_S)
    log.error("worker %d: the supervisor (pid %d) is gone; stopping", os.getpid(), supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def _work(settings: ReceiverSettings, listening: socket.socket, limits: AssociationLimits, slot: int,
          supervisor: int) -> None:
    """A worker process: open the journal (replaying orphaned segments), then accept."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the supervisor around the fork
    try:
        try:
            server = make_receiver(settings, limits=limits.for_worker(slot), listening=listening)
        except _Stopping:
            return
        except Exception:
            log.exception("worker %d (pid %d) could not start", slot, os.getpid())
            sys.exit(COULD_NOT_START)
        try:
            log.info("worker %d (pid %d) accepting on %s:%d", slot, os.getpid(), settings.host, settings.port)
            threading.Thread(target=_watch_supervisor, args=(supervisor,), name="watch-supervisor", daemon=True).start()
            server.accept_forever()
        except _Stopping:
            pass
        finally:
            stop_receiver(server)
        log.info("worker %d (pid %d) stopped", slot, os.getpid())
    except _Stopping:  # a second signal during the cleanup: nothing left to do but go
        pass


def supervise(settings: ReceiverSettings, workers: int) -> int:
    """Listen, run `workers` worker processes, replace those that die, until SIGTERM/SIGINT.
    Returns the exit status: 0 after a clean stop, 1 when a worker could not start."""
    if workers < 1:
        raise ValueError("at least one worker")
    listening = listen(settings.host, settings.port)
    settings = replace(settings, port=listening.getsockname()[1])  # port 0: the one the kernel chose
    limits = settings.limits(workers)
    context = multiprocessing.get_context("fork")
    stopping: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)

    def start(slot: int) -> BaseProcess:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the child installs its handlers first
        try:
            process = context.Process(target=_work, args=(settings, listening, limits, slot, os.getpid()),
                                      name=f"kaapana-receive-worker-{slot}")
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    log_start(settings, workers)
    processes = {slot: start(slot) for slot in range(workers)}
    status = 0
    while not stopping:
        multiprocessing.connection.wait([p.sentinel for p in processes.values()], timeout=0.5)
        for slot, process in list(processes.items()):
            if process.is_alive() or stopping:
                continue
            process.join()
            if process.exitcode == COULD_NOT_START:
                log.error("worker %d could not start; stopping the receiver", slot)
                stopping.append("a worker could not start")
                status = 1
                break
            log.error("worker %d (pid %s) ended (exit status %s); replacing it", slot, process.pid, process.exitcode)
            limits.forget(slot)  # its associations ended with it
            processes[slot] = start(slot)
    log.info("stopping (%s): %d workers", stopping[0], len(processes))
    for process in processes.values():
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive() and process.pid is not None:
            log.error("worker pid %d did not stop within %gs; killed", process.pid, STOP_GRACE_S)
            os.kill(process.pid, signal.SIGKILL)  # its journal segment is replayed at the next start
            process.join()
    listening.close()
    return status


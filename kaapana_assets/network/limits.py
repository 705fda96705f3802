"""The receiver's association limits — at most `max_per_caller` concurrent associations per
peer address and `max_associations` in all — counted once for every worker process of
`kaapana receive` (`network/workers.py`), not per process.

The counts live in a small table in shared memory (`mmap` of an unlinked temporary file,
inherited by the workers when they are forked): one row of counters per worker, one column per
peer address. A worker counts an association in its own row from the moment it accepts the
connection until the association has ended; when a worker dies, the supervisor clears its row
(`forget`), so a dead worker's associations stop counting. The table is changed under a POSIX
record lock (`lockf`) on the file, which the kernel releases when its holder dies: a worker
killed at any moment never leaves the table locked. Threads of one process take a
threading.Lock first (record locks belong to the process, not to the thread).

The same table spreads the associations: a worker waits in accept() only while it serves no
more associations than the least busy worker that is accepting (`my_turn`). A burst of
connections would otherwise go to the first worker awake: it takes every connection already
queued before the others run."""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import mmap
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import numpy as np

KEY_BYTES = 16  # an IPv6 address; IPv4 addresses as IPv4-mapped IPv6, anything else hashed


class Limit(Enum):
    PER_CALLER = "per_caller"
    TOTAL = "total"


@dataclass(frozen=True)
class Refused:
    """Why an accepted connection is refused: which limit, and how many it counted."""

    limit: Limit
    busy: int  # associations counted against that limit (from that address, or in all)
    allowed: int


def _key(host: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # not an IP address (a Unix socket path, say): its digest
        return hashlib.sha256(host.encode("utf-8", "replace")).digest()[:KEY_BYTES]
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
    return address.packed


class AssociationLimits:
    """Shared counts of running associations per peer address and in all, over `workers`
    processes; `worker` is this process's row (set in each worker after the fork)."""

    def __init__(self, max_per_caller: int, max_associations: int, workers: int = 1) -> None:
        if max_per_caller < 1 or max_associations < 1 or workers < 1:
            raise ValueError("association limits and the number of workers must be at least 1")
        self.max_per_caller, self.max_associations, self.workers = max_per_caller, max_associations, workers
        self.worker = 0
        # Every counted address holds at least one association: max_associations columns suffice.
        self.slots = max_associations
        self._file = tempfile.TemporaryFile(prefix="kaapana-receive-limits-")
        counts_at = self.slots * KEY_BYTES
        accepting_at = counts_at + workers * self.slots * 4
        size = accepting_at + workers * 4
        self._file.truncate(size)
        self._map = mmap.mmap(self._file.fileno(), size)  # MAP_SHARED: the forked workers see one table
        self._keys = np.frombuffer(self._map, dtype=np.uint8, count=counts_at).reshape(self.slots, KEY_BYTES)
        self._counts = np.frombuffer(self._map, dtype=np.int32, offset=counts_at,
                                     count=workers * self.slots).reshape(workers, self.slots)
        self._accepting = np.frombuffer(self._map, dtype=np.int32, offset=accepting_at, count=workers)
        self._thread_lock = threading.Lock()

    def for_worker(self, worker: int) -> AssociationLimits:
        """This process counts in row `worker` (called in the worker after the fork)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not one of 0..{self.workers - 1}")
        self.worker = worker
        self._thread_lock = threading.Lock()  # a fresh one: never one copied while another thread held it
        return self

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)

    def _slot(self, key: bytes) -> int | None:
        matches = np.flatnonzero((self._keys == np.frombuffer(key, dtype=np.uint8)).all(axis=1))
        return int(matches[0]) if matches.size else None

    def acquire(self, host: str) -> Refused | None:
        """Count one more association from `host`, or say which limit refuses it."""
        key = _key(host)
        with self._locked():
            per_slot = self._counts.sum(axis=0)
            total = int(per_slot.sum())
            if total >= self.max_associations:
                return Refused(Limit.TOTAL, total, self.max_associations)
            slot = self._slot(key)
            busy = int(per_slot[slot]) if slot is not None else 0
            if busy >= self.max_per_caller:
                return Refused(Limit.PER_CALLER, busy, self.max_per_caller)
            if slot is None:  # a free column exists: fewer than max_associations are counted
                slot = int(np.flatnonzero(per_slot == 0)[0])
                self._keys[slot] = np.frombuffer(key, dtype=np.uint8)
            self._counts[self.worker, slot] += 1
            return None

    def release(self, host: str) -> None:
        """The association from `host` counted by this process has ended."""
        with self._locked():
            slot = self._slot(_key(host))
            if slot is not None and self._counts[self.worker, slot] > 0:
                self._counts[self.worker, slot] -= 1

    def forget(self, worker: int) -> None:
        """A worker died: its associations ended with it (the supervisor, before replacing it)."""
        with self._locked():
            self._accepting[worker] = 0
            self._counts[worker] = 0

    def accepting(self) -> None:
        """This worker accepts connections from now on (its journal is open)."""
        self._accepting[self.worker] = 1

    def my_turn(self) -> bool:
        """Whether this worker serves no more associations than the least busy accepting one
        (read without the lock: a hint, not a count)."""
        busy = self._counts.sum(axis=1)
        others = busy[self._accepting != 0]
        return others.size == 0 or busy[self.worker] <= others.min()

    def running(self, host: str | None = None) -> int:
        """Associations counted from `host`, or in all."""
        with self._locked():
            if host is None:
                return int(self._counts.sum())
            slot = self._slot(_key(host))
            return 0 if slot is None else int(self._counts[:, slot].sum())

"""A write-ahead journal that makes a received instance durable with one flush.

Acknowledging a C-STORE only once the instance is on stable storage costs, done directly,
two journal commits of the filesystem per instance (fsync of the new file, fsync of its folder
after the rename): the larger part of a CT slice's time on one association. Here:

1. the spool file is written as usual (temp name, rename) but not flushed;
2. the instance and its spool path are appended to a journal segment, a file written full
   of zeros when it was created, and `fdatasync`ed. Overwriting blocks that already exist
   changes no metadata, so this is one flush of data blocks, not a filesystem commit;
3. then the C-STORE is acknowledged.

Every `checkpoint_s` (and whenever the segment is full) a checkpoint flushes the whole
filesystem the spool lives on (`syncfs`), which makes every spool file written so far
durable, and only then starts a new generation of the segment, which invalidates the
records of the previous one. Nothing is invalidated before what it protects is durable.

After a crash, `ReceiveJournal.open` replays the records of the current generation:
every acknowledged instance whose spool file is missing or incomplete is written again
(byte for byte; the ingest treats an instance it already indexed with the same bytes as a
no-op). A record is valid only if its magic, generation, bounds and CRC-32 are; replay
stops at the first invalid one. Records are appended under a lock, so a torn record was
never acknowledged: any later record's flush would have flushed it too.

Instances larger than a quarter of a segment bypass the journal (fsync, rename, fsync of
the folder, as before): for them the flush is small beside the transfer.

The journal lives beside the spool, never in it (`journal_folder`: `<spool>-journal/`, for a
home `<home>/incoming-journal/`), so that an ingest of the spool folder reads nothing of the
receiver's. A journal that an earlier version kept inside the spool (`<spool>/.journal/`) is
replayed and removed when a journal opens.

Several receivers may share a spool (the workers of `kaapana receive`, STOW-RS): each holds
an exclusive `flock` on its own segment (`segment-<k>.wal`); a segment nobody holds is
replayed by the next receiver that opens the journal. Journals open one at a time (a `flock`
on `open.lock`), so two starting together never take or create the same segment.
Linux: `syncfs(2)` through libc; elsewhere `os.sync()`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import shutil
import struct
import threading
import zlib
from pathlib import Path

from kaapana_assets.files import flush, sync_dir, sync_filesystem, write_atomically
from kaapana_assets.network.spool_writer import digest_name, target_path, write_durably

log = logging.getLogger("kaapana.receiver")

SEGMENT_BYTES = 64 * 2**20  # ≈2,500 CT slices between forced checkpoints
CHECKPOINT_S = 1.0  # far below the spool's quiet period: a record is invalid long before its file is ingested
HEADER_BYTES = 4096  # one filesystem block: the generation is rewritten in place
_HEADER = struct.Struct("<8sQI")  # magic, generation, CRC-32 of the two
_HEADER_MAGIC = b"KAAPJRNL"
_RECORD = struct.Struct("<4sQIQI")  # magic, generation, path length, data length, CRC-32
_RECORD_MAGIC = b"KREC"
LEGACY_FOLDER = ".journal"  # where the journal lived inside the spool, before it moved beside it


def journal_folder(spool: Path) -> Path:
    """Where the receive journal of `spool` lives: beside it, `<spool>-journal`."""
    return spool.with_name(f"{spool.name}-journal")


def _random_generation() -> int:
    """A fresh start for a segment's generations: below 2**56, so counting up never overflows
    the 64-bit field, and random, so no stale record can pass for one of the new generation."""
    return int.from_bytes(os.urandom(5), "little") << 16


def _record_crc(generation: int, path: bytes, data: bytes | memoryview) -> int:
    crc = zlib.crc32(struct.pack("<QIQ", generation, len(path), len(data)))
    return zlib.crc32(data, zlib.crc32(path, crc))


class JournalError(OSError):
    """The journal cannot be opened or written; the receiver refuses to run without it."""


class ReceiveJournal:
    """Durable spool writes for `kaapana receive` (see the module docstring).

    `store(folder, name, data)` returns once the instance is durable, as
    `spool_writer.write_durably` does, and follows the same naming rule. With
    `async_spool`, the spool file is written by a writer thread after that; `wait_written()`
    returns once everything stored so far is in the spool (the receiver waits for it before
    it confirms an association's release)."""

    def __init__(self, spool: Path, *, segment_bytes: int = SEGMENT_BYTES, checkpoint_s: float = CHECKPOINT_S,
                 async_spool: bool = True) -> None:
        if segment_bytes < 4 * HEADER_BYTES:
            raise ValueError(f"a journal segment needs at least {4 * HEADER_BYTES} bytes")
        self.spool = spool
        self.folder = journal_folder(spool)
        self.segment_bytes = segment_bytes
        self.max_record = segment_bytes // 4
        self.checkpoint_s = checkpoint_s
        self.async_spool = async_spool
        self.segment: Path | None = None
        self._fd = -1
        self._lock = threading.Lock()  # the segment: appends, generations (taken before _spool_lock)
        self._generation = 0
        self._offset = HEADER_BYTES
        self._appended = 0  # records in the current generation
        # Spool files acknowledged but not yet written (async_spool), by target; the writer's
        # progress; writes that failed (disk full...) and are retried at every checkpoint.
        self._spool_lock = threading.Condition(threading.Lock())
        self._pending: dict[Path, bytes] = {}
        self._queue: queue.SimpleQueue[tuple[Path, bytes] | None] = queue.SimpleQueue()
        self._queued = 0
        self._written = 0
        self._failed: list[tuple[Path, bytes]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- life cycle -----------------------------------------------------------------

    def open(self) -> int:
        """Take a segment, replay what crashed receivers left, start checkpointing.
        Returns the number of instances written back into the spool."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.folder / "open.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one opening at a time: released when closed, or its process dies
            replayed = self._replay_legacy() + self._open_segments()
        finally:
            os.close(lock)
        if replayed:
            log.warning("replayed %d acknowledged instance(s) from the receive journal into %s", replayed, self.spool)
        self._threads = [threading.Thread(target=self._checkpoint_loop, name="journal-checkpoint", daemon=True)]
        if self.async_spool:
            self._threads.append(threading.Thread(target=self._write_loop, name="journal-spool-writer", daemon=True))
        for thread in self._threads:
            thread.start()
        return replayed

    def _replay_legacy(self) -> int:
        """Replay and remove the segments of a journal kept inside the spool (`<spool>/.journal`)."""
        legacy = self.spool / LEGACY_FOLDER
        if not legacy.is_dir():
            return 0
        replayed, kept = 0, 0
        for path in sorted(legacy.iterdir()):
            if not (path.name.startswith("segment-") and path.name.endswith(".wal")):
                continue
            fd = _lock_segment(path)
            if fd is None:
                kept += 1  # a receiver of the earlier version still writes into it
                continue
            try:
                replayed += self._replay(fd, path)[1]  # durable in the spool when this returns
                path.unlink()
            finally:
                os.close(fd)
        if kept:
            log.warning("%d segment(s) of the receive journal in %s are held by a running receiver; they are replayed "
                        "when it has stopped and a receiver opens the journal again", kept, legacy)
        else:
            try:
                shutil.rmtree(legacy)  # every record is in the spool now; nothing else in there was data
            except OSError as exc:
                log.warning("could not remove %s after replaying it: %s", legacy, exc)
            else:
                log.info("moved the receive journal out of the spool: %s replayed and removed; it lives in %s",
                         legacy, self.folder)
        return replayed

    def _open_segments(self) -> int:
        """Replay every segment nobody holds; take the first of them (or a new one)."""
        replayed = 0
        index = 0
        while True:
            path = self.folder / f"segment-{index}.wal"
            if not path.exists():
                if self._fd < 0:
                    self._create(path)
                    self._take(path)
                break
            fd = _lock_segment(path)
            if fd is None:
                index += 1  # another receiver's segment
                continue
            generation, count = self._replay(fd, path)
            replayed += count
            if self._fd < 0:
                self._fd, self.segment, self._generation = fd, path, generation
                self._new_generation()
            else:  # an orphan: its records are durable now; invalidate them and let it go
                self._write_header(fd, generation + 1)
                os.close(fd)
            index += 1
        return replayed

    def close(self) -> None:
        """Write every acknowledged instance into the spool, make it durable, release."""
        self._stop.set()
        if self.async_spool and self._threads:
            self._queue.put(None)  # the writer drains the queue, then stops
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self._fd >= 0:
            with self._lock:
                self._retry_failed()
                if self._appended and not self._failed:
                    self._checkpoint_locked()
                elif self._failed:
                    log.error("%d acknowledged instance(s) could not be written into the spool; they stay in the "
                              "receive journal %s and are written back when the receiver starts again",
                              len(self._failed), self.segment)
                os.close(self._fd)  # releases the flock
                self._fd = -1

    def __enter__(self) -> ReceiveJournal:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ----------------------------------------------------------------------

    def store(self, folder: Path, name: str, data: bytes) -> Path:
        """Write `data` as folder/name (a different existing file keeps its name: the new one
        gets its content digest in its name); durable when this returns."""
        if self._fd < 0:
            raise JournalError(errno.EBADF, "the receive journal is not open")
        if len(data) > self.max_record:
            return write_durably(folder, name, data)  # one large file: its own flushes are cheap beside it
        if not self.async_spool:
            target = self._choose(folder, name, data)
            self._write_spool_file(target, data)  # a checkpoint after the append flushes it; before, the record covers it
        with self._lock:
            if self.async_spool:
                target = self._choose(folder, name, data)
            relative = target.relative_to(self.spool).as_posix().encode()
            size = _RECORD.size + len(relative) + len(data)
            if self._offset + size > self.segment_bytes:
                self._checkpoint_locked()  # everything so far durable in the spool; start over
            generation = self._generation
            header = _RECORD.pack(_RECORD_MAGIC, generation, len(relative), len(data),
                                  _record_crc(generation, relative, data))
            written = os.pwritev(self._fd, [header, relative, data], self._offset)
            if written != size:
                raise JournalError(errno.EIO, f"short write to the receive journal ({written} of {size} bytes)")
            self._offset += size
            self._appended += 1
            if self.async_spool:
                with self._spool_lock:
                    self._pending[target] = data
                    self._queued += 1
                    self._queue.put((target, data))
        flush(self._fd, data_only=True)  # one flush of data blocks; concurrent associations share theirs
        return target

    def _choose(self, folder: Path, name: str, data: bytes) -> Path:
        """`spool_writer.target_path`, with the files still waiting for the writer counted as written."""
        with self._spool_lock:
            pending = self._pending.get(folder / name)
        if pending is not None and pending == data:
            return folder / name
        return target_path(folder, name, data) if pending is None else folder / digest_name(name, data)

    def wait_written(self, timeout: float | None = None) -> bool:
        """Until every instance stored so far is in the spool (or failed to be written)."""
        with self._spool_lock:
            upto = self._queued
            return self._spool_lock.wait_for(lambda: self._written >= upto, timeout)

    @staticmethod
    def _write_spool_file(target: Path, data: bytes) -> None:
        write_atomically(target, data, durable=False)  # the next checkpoint's syncfs makes it durable

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            target, data = item
            try:
                self._write_spool_file(target, data)
            except Exception as exc:  # acknowledged and durable in the journal: retried, never dropped
                log.error("could not write %s into the spool (%s); kept in the receive journal, retried", target, exc)
                with self._spool_lock:
                    self._failed.append((target, data))
            with self._spool_lock:
                if self._pending.get(target) is data:
                    del self._pending[target]
                self._written += 1
                self._spool_lock.notify_all()

    def _retry_failed(self) -> None:
        with self._spool_lock:
            failed, self._failed = self._failed, []
        still = []
        for target, data in failed:
            try:
                self._write_spool_file(target, data)
            except Exception:
                still.append((target, data))
        with self._spool_lock:
            self._failed = still + self._failed

    # --- checkpoints ------------------------------------------------------------------

    def checkpoint(self) -> bool:
        """Make every spool file written so far durable and invalidate their records, without
        holding up writers during the flush. False when writes came in meanwhile, or some
        spool file could not be written (the next checkpoint, or a full segment, tries again)."""
        with self._lock:
            if not self._appended or self._fd < 0:
                return True
            generation, appended = self._generation, self._appended
        if not self._drain():
            return False
        sync_filesystem(self.spool)
        with self._lock:
            if (self._generation, self._appended) != (generation, appended):
                return False
            self._new_generation()
            return True

    def _drain(self) -> bool:
        """Everything appended so far is in the spool (written or retried now)."""
        self.wait_written()
        self._retry_failed()
        with self._spool_lock:
            return not self._failed

    def _checkpoint_locked(self) -> None:
        if not self._drain():
            raise JournalError(errno.ENOSPC, "the receive journal is full and acknowledged instances still cannot "
                                             "be written into the spool")
        sync_filesystem(self.spool)
        self._new_generation()

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self.checkpoint_s):
            try:
                self.checkpoint()
            except OSError as exc:  # keep serving: writes stay durable through the journal
                log.error("receive journal checkpoint failed: %s", exc)

    def _new_generation(self) -> None:
        self._generation += 1
        self._write_header(self._fd, self._generation)
        self._offset = HEADER_BYTES
        self._appended = 0

    @staticmethod
    def _write_header(fd: int, generation: int) -> None:
        header = _HEADER.pack(_HEADER_MAGIC, generation, zlib.crc32(_HEADER_MAGIC + struct.pack("<Q", generation)))
        os.pwrite(fd, header.ljust(HEADER_BYTES, b"\x00"), 0)
        flush(fd, data_only=True)

    def _create(self, path: Path) -> None:
        """A segment full of zeros, durable with its folder entry, before it is used."""
        temp = path.with_name(f".{path.name}.part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            zeros = bytes(2**20)
            for start in range(0, self.segment_bytes, len(zeros)):
                os.write(fd, zeros[: min(len(zeros), self.segment_bytes - start)])
            flush(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        sync_dir(self.folder)

    def _take(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd, self.segment, self._generation = fd, path, _random_generation()
        self._new_generation()

    # --- replay -----------------------------------------------------------------------

    def _replay(self, fd: int, path: Path) -> tuple[int, int]:
        """Write back the valid records of the segment's current generation; returns the
        generation and how many files were (re)written. Ends with a checkpoint."""
        size = os.fstat(fd).st_size
        magic, generation, crc = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        if magic != _HEADER_MAGIC or crc != zlib.crc32(_HEADER_MAGIC + struct.pack("<Q", generation)):
            # A header torn while it was rewritten: its records were all durable before that.
            # Go on from a random generation, so that no stale record can pass for a new one.
            log.warning("receive journal %s: no valid header; nothing to replay", path)
            return _random_generation(), 0
        offset, rewritten = HEADER_BYTES, 0
        while offset + _RECORD.size <= size:
            rmagic, rgeneration, path_len, data_len, rcrc = _RECORD.unpack(os.pread(fd, _RECORD.size, offset))
            end = offset + _RECORD.size + path_len + data_len
            if rmagic != _RECORD_MAGIC or rgeneration != generation or end > size or path_len > 4096:
                break
            body = os.pread(fd, path_len + data_len, offset + _RECORD.size)
            relative, data = body[:path_len], memoryview(body)[path_len:]
            if _record_crc(generation, relative, data) != rcrc:
                break  # torn: it and nothing after it was acknowledged
            rewritten += self._restore(relative, data)
            offset = end
        if rewritten:
            sync_filesystem(self.spool)
        return generation, rewritten

    def _restore(self, relative: bytes, data: memoryview) -> int:
        name = relative.decode("utf-8", "replace")
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            log.error("receive journal: record with an unsafe spool path %r skipped", name)
            return 0
        target = self.spool.joinpath(*parts)
        try:
            if target.stat().st_size == len(data) and target.read_bytes() == data:
                return 0  # survived (the process died, the machine did not)
        except FileNotFoundError:
            pass
        write_atomically(target, data, durable=False)  # the replay ends with one syncfs
        return 1


def _lock_segment(path: Path) -> int | None:
    """The segment open and locked for this receiver; None where another receiver holds it."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        return None
    return fd

"""The receiver's write-ahead journal: an acknowledged instance survives the loss of
everything that was not flushed, and nothing is invalidated before it is durable.

Crashes are real: a writer process is killed with SIGKILL after `store` returned. What a
power cut could still take (spool files not yet flushed) is then removed by hand, and a new
journal must write it back byte for byte."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kaapana_assets.ingest.spool import scan_spool
from kaapana_assets.network import journal as journal_module
from kaapana_assets.network.journal import HEADER_BYTES, ReceiveJournal

SMALL = 1 << 20  # a 1 MiB segment: quick to create, fills after a few dozen instances


def instance(index: int, size: int = 20_000) -> bytes:
    return (f"instance {index} ".encode() * (size // 12 + 1))[:size]


def spool_contents(spool: Path) -> dict[str, bytes]:
    return {Path(f.path).relative_to(spool).as_posix(): Path(f.path).read_bytes() for f in scan_spool(spool)}


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kaapana_assets.network.journal import ReceiveJournal
    spool, count, async_spool = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    journal = ReceiveJournal(spool, segment_bytes=1 << 20, checkpoint_s=3600, async_spool=async_spool)
    journal.open()
    for i in range(count):
        data = (f"instance {i} ".encode() * 2000)[:20000]
        journal.store(spool / "MODALITY", f"1.2.3.{i}.dcm", data)  # durable: "acknowledged"
    journal.wait_written()
    print("stored", flush=True)
    time.sleep(600)
""")


def crashed_writer(spool: Path, count: int, async_spool: bool = True) -> None:
    """A process stores `count` instances, then dies by SIGKILL without a checkpoint."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool), str(count), "1" if async_spool else "0"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "stored"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("async_spool", [True, False], ids=["spool-written-after-ack", "spool-written-before-ack"])
def test_acknowledged_instances_lost_from_the_spool_are_written_back(tmp_path: Path, async_spool: bool) -> None:
    spool = tmp_path / "incoming"
    crashed_writer(spool, 5, async_spool)
    written = spool_contents(spool)
    assert sorted(written) == [f"MODALITY/1.2.3.{i}.dcm" for i in range(5)]
    # what a power cut can take: files never flushed vanish, or keep their name but not their data
    (spool / "MODALITY" / "1.2.3.0.dcm").unlink()
    (spool / "MODALITY" / "1.2.3.1.dcm").write_bytes(b"")
    (spool / "MODALITY" / "1.2.3.2.dcm").write_bytes(instance(2)[:100])

    journal = ReceiveJournal(spool, segment_bytes=SMALL)
    assert journal.open() == 3  # the intact two are left alone
    journal.close()
    assert spool_contents(spool) == written
    # after the replay and a checkpoint, the records are spent: the ingest may take the files
    for path in (spool / "MODALITY").iterdir():
        path.unlink()
    with ReceiveJournal(spool, segment_bytes=SMALL) as again:
        assert again.segment == journal.segment
    assert spool_contents(spool) == {}


def test_a_checkpoint_spends_the_records_only_once_their_files_are_durable(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    journal = ReceiveJournal(spool, segment_bytes=SMALL, checkpoint_s=3600)
    journal.open()
    try:
        journal.store(spool / "A", "1.2.dcm", instance(1))
        assert journal.checkpoint()
        journal.store(spool / "A", "1.3.dcm", instance(2))
        # a write that comes in while the checkpoint flushes: that checkpoint spends nothing
        original = journal_module.sync_filesystem

        def flush_with_a_write_meanwhile(path: Path) -> None:
            original(path)
            thread = threading.Thread(target=journal.store, args=(spool / "A", "1.4.dcm", instance(3)))
            thread.start()
            thread.join()

        journal_module.sync_filesystem = flush_with_a_write_meanwhile
        try:
            assert not journal.checkpoint()
        finally:
            journal_module.sync_filesystem = original
        generation = journal._generation
        assert journal.checkpoint() and journal._generation == generation + 1
    finally:
        journal.close()
    assert sorted(spool_contents(spool)) == ["A/1.2.dcm", "A/1.3.dcm", "A/1.4.dcm"]


def test_replay_stops_at_a_torn_record(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    crashed_writer(spool, 4)
    segment = journal_module.journal_folder(spool) / "segment-0.wal"
    data = bytearray(segment.read_bytes())
    # the third record was being written when the power went: its last bytes never arrived
    third = data.find(instance(2)[:200], HEADER_BYTES)
    assert third > 0
    data[third + 19_000] ^= 0xFF
    segment.write_bytes(bytes(data))
    for path in (spool / "MODALITY").iterdir():
        path.unlink()
    with ReceiveJournal(spool, segment_bytes=SMALL) as journal:
        assert journal.segment == segment
    # a torn record was never acknowledged, nor anything after it (its flush would have carried it)
    assert sorted(spool_contents(spool)) == ["MODALITY/1.2.3.0.dcm", "MODALITY/1.2.3.1.dcm"]


def test_a_full_segment_checkpoints_and_starts_over(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    with ReceiveJournal(spool, segment_bytes=SMALL, checkpoint_s=3600) as journal:
        first = journal._generation
        for i in range(120):  # 2.4 MB through a 1 MiB segment
            journal.store(spool / "CT", f"1.2.{i}.dcm", instance(i))
        assert journal._generation >= first + 2 and journal._offset <= SMALL
    assert len(spool_contents(spool)) == 120
    assert (journal_module.journal_folder(spool) / "segment-0.wal").stat().st_size == SMALL  # never grows


def test_an_instance_larger_than_a_quarter_segment_is_flushed_on_its_own(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    with ReceiveJournal(spool, segment_bytes=SMALL) as journal:
        big = instance(7, SMALL // 2)
        target = journal.store(spool / "MR", "1.9.dcm", big)
        assert journal._appended == 0 and target.read_bytes() == big


def test_a_different_instance_under_a_pending_name_gets_its_digest_name(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    with ReceiveJournal(spool, segment_bytes=SMALL) as journal:
        first = journal.store(spool / "CT", "1.5.dcm", instance(1))
        again = journal.store(spool / "CT", "1.5.dcm", instance(1))  # a retransmission
        other = journal.store(spool / "CT", "1.5.dcm", instance(2))  # same UID, other bytes
        assert first == again == spool / "CT" / "1.5.dcm"
        assert other.name.startswith("1.5.") and other != first
    assert spool_contents(spool) == {"CT/1.5.dcm": instance(1), f"CT/{other.name}": instance(2)}


def test_a_spool_file_that_cannot_be_written_is_kept_in_the_journal_and_retried(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    journal = ReceiveJournal(spool, segment_bytes=SMALL, checkpoint_s=3600)
    journal.open()
    disk_full = threading.Event()
    disk_full.set()
    write = ReceiveJournal._write_spool_file

    def write_unless_full(target: Path, data: bytes) -> None:
        if disk_full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        write(target, data)

    journal._write_spool_file = write_unless_full  # type: ignore[method-assign]
    try:
        target = journal.store(spool / "CT", "1.6.dcm", instance(6))  # acknowledged: it is in the journal
        assert journal.wait_written(10) and not target.exists()
        assert not journal.checkpoint()  # its record must not be spent
        with pytest.raises(OSError, match="journal is full"):
            for i in range(100):  # the segment fills up: refused, not lost
                journal.store(spool / "CT", f"1.7.{i}.dcm", instance(i))
        disk_full.clear()
        assert journal.checkpoint() and target.read_bytes() == instance(6)
    finally:
        journal.close()


def test_two_receivers_on_one_spool_each_take_a_segment_and_replay_an_orphan(tmp_path: Path) -> None:
    spool = tmp_path / "incoming"
    with ReceiveJournal(spool, segment_bytes=SMALL) as held:
        crashed_writer(spool, 3)  # a second receiver, which dies: it wrote into segment-1
        assert held.segment is not None and held.segment.name == "segment-0.wal"
        assert (journal_module.journal_folder(spool) / "segment-1.wal").exists()
        for path in (spool / "MODALITY").iterdir():
            path.unlink()
        with ReceiveJournal(spool, segment_bytes=SMALL) as third:
            assert third.segment is not None and third.segment.name == "segment-1.wal"
        assert len(spool_contents(spool)) == 3


def test_a_journal_that_is_not_open_refuses_to_store(tmp_path: Path) -> None:
    journal = ReceiveJournal(tmp_path / "incoming", segment_bytes=SMALL)
    with pytest.raises(OSError, match="not open"):
        journal.store(tmp_path / "incoming" / "CT", "1.dcm", b"x")


def test_a_journal_kept_inside_the_spool_is_replayed_and_removed(tmp_path: Path) -> None:
    """A receiver of the earlier layout crashed with its journal in `<spool>/.journal`: the next
    journal replays it into the spool, removes it, and lives beside the spool."""
    spool = tmp_path / "incoming"
    crashed_writer(spool, 4)
    written = spool_contents(spool)
    journal_module.journal_folder(spool).rename(spool / journal_module.LEGACY_FOLDER)  # the earlier layout
    for path in (spool / "MODALITY").iterdir():
        path.unlink()  # never reached the disk
    with ReceiveJournal(spool, segment_bytes=SMALL) as journal:
        assert journal.segment == tmp_path / "incoming-journal" / "segment-0.wal"
    assert spool_contents(spool) == written
    assert sorted(p.name for p in spool.iterdir()) == ["MODALITY"]  # nothing of the journal left in the spool

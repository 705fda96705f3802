"""`kaapana receive --workers N` as real processes on loopback: associations spread over the
workers, one per-address limit over all of them, and a worker killed mid-association loses no
instance it acknowledged."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import Receiver, dataset_bytes

# slow tier (`make test-all`): receiver processes
pytestmark = pytest.mark.slow


def associate(port: int, calling: str, *contexts: str, address: str = "127.0.0.1") -> Association:
    ae = AE(ae_title=calling)
    for context in contexts or (Verification,):
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="KAAPANA", bind_address=(address, 0))


def test_workers_share_the_port_and_one_per_address_limit(tmp_path: Path, corpus: dict) -> None:
    """Four associations opened at once store every instance byte for byte, served by both
    workers; then four associations held from another address land on both workers, and the
    fifth is refused (the limit of four counts over the workers, not per worker)."""
    receiver = Receiver(tmp_path / "home", options=["--workers", "2", "--max-per-caller", "4"])
    try:
        workers = receiver.accepting(2)
        files = [f for study in corpus["site-a"] for f in study.ct_files][:24]

        all_open = threading.Barrier(4, timeout=30)

        def send(share: list[Path]) -> list[int]:
            assoc = associate(receiver.port, "PARALLEL", CTImageStorage, address="127.0.0.2")
            assert assoc.is_established
            all_open.wait()  # four running at once, however the threads were scheduled
            statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in share]
            assoc.release()
            return statuses

        with ThreadPoolExecutor(4) as pool:  # four connections in one burst
            statuses = [s for part in pool.map(send, [files[i::4] for i in range(4)]) for s in part]
        assert statuses == [0] * len(files)
        # The busier worker leaves the next connection to the other (a burst would otherwise
        # go to the first worker awake).
        assert set(receiver.served_by("PARALLEL")) == set(workers)

        held = [associate(receiver.port, "HOLDER") for _ in range(4)]
        try:
            assert all(a.is_established for a in held)
            refused = associate(receiver.port, "HOLDER")
            assert not refused.is_established and (refused.is_rejected or refused.is_aborted)  # A-ASSOCIATE-RJ
            assert len(set(receiver.served_by("HOLDER"))) == 2  # the four are spread over both workers
        finally:
            for a in held:
                a.release()
        assert "refused association from 127.0.0.1: it holds 4 concurrent associations (limit 4 per address)" \
            in receiver.log()
    except BaseException:
        print(receiver.log())
        raise
    finally:
        receiver.stop()
    spool = tmp_path / "home" / "incoming" / "PARALLEL"
    for f in files:
        ds = pydicom.dcmread(f)
        assert dataset_bytes(spool / f"{ds.SOPInstanceUID}.dcm") == encode(ds, False, True)


def test_a_worker_killed_mid_association_loses_no_acknowledged_instance(tmp_path: Path, corpus: dict) -> None:
    """A sender's association dies with the worker serving it (SIGKILL by its PID, between two
    C-STOREs or in the middle of one); the supervisor replaces the worker, which replays the
    dead one's journal segment before it accepts. Every instance the sender got a success
    status for is in the spool, byte for byte, and the other worker served on meanwhile."""
    home = tmp_path / "home"
    receiver = Receiver(home, options=["--workers", "2", "--checkpoint-interval", "3600"])
    files = [f for site in corpus.values() for study in site for f in study.ct_files]
    acknowledged: list[pydicom.Dataset] = []
    enough = threading.Event()

    def send() -> None:
        assoc = associate(receiver.port, "VICTIM", CTImageStorage)
        assert assoc.is_established
        for f in files:
            ds = pydicom.dcmread(f)
            status = assoc.send_c_store(ds)
            if "Status" not in status or status.Status != 0:
                break  # the association is gone
            acknowledged.append(ds)
            if len(acknowledged) == 10:
                enough.set()
        assoc.abort()

    try:
        first = receiver.accepting(2)
        sender = threading.Thread(target=send)
        sender.start()
        assert enough.wait(30), receiver.log()
        [victim] = receiver.served_by("VICTIM")
        os.kill(victim, signal.SIGKILL)
        sender.join(60)
        assert 10 <= len(acknowledged) < len(files)
        assert receiver.echo()  # served meanwhile
        replacement = receiver.accepting(3)[2]
        assert replacement not in first and victim in first
        assert f"(pid {victim}) ended (exit status -9); replacing it" in receiver.log()
    finally:
        receiver.stop()
    for ds in acknowledged:
        assert dataset_bytes(home / "incoming" / "VICTIM" / f"{ds.SOPInstanceUID}.dcm") == encode(ds, False, True)

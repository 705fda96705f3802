"""`kaapana receive` under abuse, as a real process on loopback: a caller hoarding idle
associations, empty / garbage / mismatched / inflation-bomb data sets, silent connections."""

from __future__ import annotations

import os
import re
import socket
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import Receiver, dataset_bytes, needs_dcmtk, storescu

# slow tier (`make test-all`): receiver processes under abuse
pytestmark = pytest.mark.slow

CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0xC210, 0xA900
ATTACKER = "127.0.0.2"  # all of 127/8 is loopback on Linux: a second caller address
WORKERS = 2  # every limit below holds over the worker processes together


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    # defaults: 16 associations per address, 256 in all (over the workers)
    r = Receiver(tmp_path / "home", options=["--workers", str(WORKERS)])
    yield r
    r.stop()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def minimal_dataset(sop_uid: str | None = None) -> pydicom.Dataset:
    """The smallest data set the ingest indexes (no pixels)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "ABUSE-1"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def c_store_bytes(monkeypatch: pytest.MonkeyPatch, port: int, announced: pydicom.Dataset, payload: bytes,
                  transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """A C-STORE whose request announces `announced`'s SOP Class/Instance UIDs and whose data
    set on the wire is `payload`, whatever it is (the peer, not our code, writes the bytes)."""
    import pynetdicom.association
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, **kwargs: payload)
    original = DIMSEMessage.encode_msg

    def encode_msg(self, context_id, max_pdu_length):  # type: ignore[no-untyped-def]
        yield from original(self, context_id, max_pdu_length)
        if not payload and self.command_set.CommandDataSetType != 0x0101:
            # pynetdicom sends no fragment for an empty data set: send the last one, empty.
            empty = P_DATA()
            empty.presentation_data_value_list.append((context_id, b"\x02"))
            yield empty

    monkeypatch.setattr(DIMSEMessage, "encode_msg", encode_msg)
    announced.file_meta.TransferSyntaxUID = transfer_syntax
    ae = AE(ae_title="ABUSER")
    ae.add_requested_context(announced.SOPClassUID, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="KAAPANA")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(announced)
    finally:
        assoc.release()
    monkeypatch.undo()
    assert status, "no C-STORE response"
    return int(status.Status)


def refused_lines(receiver: Receiver, needle: str) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in receiver.log().splitlines() if " refused " in line and needle in line]
        if lines:
            return lines
        time.sleep(0.1)
    return []


@needs_dcmtk
def test_idle_associations_from_one_caller_do_not_starve_others(receiver: Receiver, corpus: dict) -> None:
    """200 associations from 127.0.0.2, negotiated and then held idle: the first 16 (the
    per-address limit) are served, the rest refused on accept; a 12-slice study from
    127.0.0.1 meanwhile arrives whole and its C-ECHO succeeds."""
    started = time.monotonic()
    ae = AE(ae_title="HOARDER")
    ae.add_requested_context(Verification)

    def open_one(_: int):  # type: ignore[no-untyped-def]
        return ae.associate("127.0.0.1", receiver.port, ae_title="KAAPANA", bind_address=(ATTACKER, 0))

    with ThreadPoolExecutor(max_workers=16) as pool:
        attempts = list(pool.map(open_one, range(200)))
    held = [a for a in attempts if a.is_established]
    try:
        assert len(held) == 16
        assert all(a.is_rejected or a.is_aborted for a in attempts if not a.is_established)
        assert held[0].send_c_echo().Status == 0  # the ones admitted are served

        study = corpus["site-a"][0]
        sent = storescu(receiver.port, study.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        received = receiver.spool_files()
        assert len(received) == len(study.files) == 13
        by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received}
        for original in study.files:
            assert dataset_bytes(by_sop[pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID]) == \
                dataset_bytes(original)
        assert receiver.echo()
    finally:
        for a in held:
            a.release()
    refusals = [line for line in receiver.log().splitlines() if f"refused association from {ATTACKER}" in line]
    assert len(refusals) == 200 - 16 and "(limit 16 per address)" in refusals[0]
    assert "refused association from 127.0.0.1" not in receiver.log()
    time.sleep(0.5)  # a limit on concurrency, not a ban: released slots serve the caller again
    again = open_one(0)
    assert again.is_established
    again.release()
    assert time.monotonic() - started < 30


def test_empty_data_set_is_refused(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = minimal_dataset()
    assert c_store_bytes(monkeypatch, receiver.port, ds, b"") == CANNOT_UNDERSTAND
    assert receiver.spool_files() == []
    [line] = refused_lines(receiver, ds.SOPInstanceUID)
    assert "from ABUSER at 127.0.0.1: not_dicom: empty data set" in line and "0xC210" in line
    assert receiver.echo()


def test_garbage_data_set_is_refused(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = minimal_dataset()
    garbage = os.urandom(50 * 2**20)  # 50 MB of random bytes
    assert c_store_bytes(monkeypatch, receiver.port, ds, garbage) == CANNOT_UNDERSTAND
    assert receiver.spool_files() == []
    [line] = refused_lines(receiver, ds.SOPInstanceUID)
    assert "from ABUSER at 127.0.0.1" in line and "nothing stored" in line
    assert receiver.echo()


def test_incomplete_data_set_is_refused(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readable, but without the attributes the ingest needs: does not match its SOP class."""
    ds = minimal_dataset()
    del ds.StudyInstanceUID
    assert c_store_bytes(monkeypatch, receiver.port, ds, encode(ds, False, True)) == DOES_NOT_MATCH
    assert receiver.spool_files() == []
    [line] = refused_lines(receiver, ds.SOPInstanceUID)
    assert "missing_tag" in line and "StudyInstanceUID" in line and "0xA900" in line


def test_data_set_with_other_uids_than_the_request_is_refused(receiver: Receiver, corpus: dict,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = corpus["site-a"][0].ct_files[0]
    real = pydicom.dcmread(original, stop_before_pixels=True)
    payload = dataset_bytes(original)  # a valid CT data set, explicit VR little endian

    announced = minimal_dataset("1.2.826.0.1.3680043.10.99")  # another SOP Instance UID
    assert c_store_bytes(monkeypatch, receiver.port, announced, payload) == DOES_NOT_MATCH
    [line] = refused_lines(receiver, "1.2.826.0.1.3680043.10.99")
    assert real.SOPInstanceUID in line and "AffectedSOPInstanceUID" in line and "uid_mismatch" in line

    announced = minimal_dataset(real.SOPInstanceUID)
    announced.SOPClassUID = MRImageStorage  # the right instance, announced as another SOP class
    assert c_store_bytes(monkeypatch, receiver.port, announced, payload) == DOES_NOT_MATCH
    [line] = refused_lines(receiver, "AffectedSOPClassUID")
    assert CTImageStorage in line and MRImageStorage in line
    assert receiver.spool_files() == []


def test_inflation_bomb_is_refused_in_bounded_memory(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflated data set: small valid elements, then 512 MiB of zeros (about 0.5 MB on the
    wire). Refused, and the peak RSS of the worker process that served it stays far below the
    inflated size."""
    ds = minimal_dataset()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as PS3.5 A.5 has it
    parts = [compressor.compress(encode(ds, False, True))]
    zeros = bytes(2**20)
    parts += [compressor.compress(zeros) for _ in range(512)]
    bomb = b"".join(parts) + compressor.flush()
    assert len(bomb) < 2**20
    workers = receiver.accepting(WORKERS)
    before = {pid: peak_rss_mb(pid) for pid in workers}
    status = c_store_bytes(monkeypatch, receiver.port, ds, bomb, DeflatedExplicitVRLittleEndian)
    [served] = receiver.served_by("ABUSER")
    before, peak = before[served], peak_rss_mb(served)
    print(f"receiver peak RSS: {before:.0f} MB before the bomb, {peak:.0f} MB after")
    assert status == CANNOT_UNDERSTAND
    assert peak < 600 and peak - before < 100
    assert receiver.spool_files() == []
    [line] = refused_lines(receiver, ds.SOPInstanceUID)
    assert "exceeds_limits" in line and "inflates beyond 256 MiB" in line
    assert receiver.echo()


def test_inflated_size_is_measured_streaming() -> None:
    from kaapana_assets.network.receiver import inflates_beyond

    def deflate(data: bytes) -> bytes:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush()

    stream = deflate(os.urandom(3 * 2**20) + bytes(5 * 2**20))  # 8 MiB inflated
    assert not inflates_beyond(stream, 8 * 2**20)
    assert inflates_beyond(stream, 8 * 2**20 - 1)
    assert inflates_beyond(stream, 2**20, step=4096)
    assert not inflates_beyond(b"not deflate at all" * 100, 10)  # left to the parser
    assert not inflates_beyond(b"", 0)


def test_deflated_data_set_is_stored(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bomb check lets honest deflated data sets through, byte for byte."""
    ds = minimal_dataset()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = compressor.compress(encode(ds, False, True)) + compressor.flush()
    assert c_store_bytes(monkeypatch, receiver.port, ds, payload, DeflatedExplicitVRLittleEndian) == 0
    [stored] = receiver.spool_files()
    assert dataset_bytes(stored) == payload


def test_silent_connections_and_idle_associations_time_out(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "home", options=["--acse-timeout", "1", "--idle-timeout", "1"])
    try:
        silent = socket.create_connection(("127.0.0.1", r.port))  # never sends an A-ASSOCIATE-RQ
        silent.settimeout(10)
        ae = AE(ae_title="IDLER")
        ae.add_requested_context(Verification)
        idle = ae.associate("127.0.0.1", r.port, ae_title="KAAPANA")
        assert idle.is_established
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the receiver
        assert time.monotonic() - started < 5
        silent.close()
        deadline = time.monotonic() + 5
        while idle.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert idle.is_aborted  # the receiver aborted it
    finally:
        r.stop()

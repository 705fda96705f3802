"""DICOM networking against dcmtk, on loopback: storescu → our receiver, our sender → storescp."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from bench import orthanc
from kaapana_assets.archive.service import Archive
from kaapana_assets.federation.local import free_port
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.ingest.spool import plan_spool, scan_spool, wait_until_quiet
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SENT
from tests.helpers import REPO, Receiver, can_unshare, dataset_bytes, needs_dcmtk, storescu
from tests.tools import dciodvfy_errors

# slow tier (`make test-all`): receiver, storescp and Orthanc processes; the encoders and the
# in-process receiver below run in the fast tier
slow = pytest.mark.slow

@pytest.fixture
def receiver(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Receiver(tmp_path / "home", allow=["STORESCU", "ECHOSCU", "KAAPANA_TEST"])
    yield r
    r.stop()


@slow
@needs_dcmtk
def test_storescu_into_receiver_then_ingest(receiver: Receiver, corpus: dict, tmp_path: Path) -> None:
    study = corpus["site-b"][0]
    scanned_ns = time.time_ns()  # the incoming sensor's previous scan
    sent = storescu(receiver.port, study.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    received = receiver.spool_files()
    assert len(received) == len(study.files)
    # What the receiver wrote carries its write time: the sensor counts the study's quiet
    # period from the last write, and it is ready exactly one quiet period after it.
    spool = scan_spool(receiver.home / "incoming")
    last_write = max(f.mtime_ns for f in spool)
    assert len(spool) == len(received) and scanned_ns < min(f.mtime_ns for f in spool) <= time.time_ns()
    waiting = plan_spool(spool, {}, last_write + 9 * 10**9, 10, scanned_ns)
    assert list(waiting.waiting.values()) == [len(received)] and not waiting.ready
    assert list(plan_spool(spool, waiting.studies_of, last_write + 10 * 10**9, 10).ready) == [study.study_uid]
    assert all(p.parent.name == "STORESCU" for p in received)
    meta = pydicom.dcmread(received[0], stop_before_pixels=True).file_meta
    assert (meta.SendingApplicationEntityTitle, meta.ReceivingApplicationEntityTitle) == ("STORESCU", "KAAPANA")
    assert "SourceApplicationEntityTitle" not in meta  # (0002,0016) names who wrote the file, not the sender
    by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received}
    for original in study.files:
        ds = pydicom.dcmread(original, stop_before_pixels=True)
        assert dataset_bytes(by_sop[ds.SOPInstanceUID]) == dataset_bytes(original)  # identical content
    report = ingest_files(received, Archive.for_home(KaapanaHome(receiver.home)))
    assert report.count("indexed") == len(study.files)
    rows = Lake(receiver.home / "lake").read(INSTANCES)
    assert set(rows["calling_ae_title"].to_list()) == {"STORESCU"} and set(rows["called_ae_title"].to_list()) == {"KAAPANA"}


@slow
@needs_dcmtk
def test_what_the_receiver_acknowledged_survives_its_crash(corpus: dict, tmp_path: Path) -> None:
    """storescu's instances are acknowledged; the receiver dies by SIGKILL before its journal
    checkpoints; the spool loses what a power cut could take (files never flushed). The
    restarted receiver writes every acknowledged instance back, byte for byte."""
    home = tmp_path / "home"
    study = corpus["site-a"][-1]
    crashed = Receiver(home, options=["--checkpoint-interval", "3600"])
    try:
        sent = storescu(crashed.port, study.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        acknowledged = {p.relative_to(home): p.read_bytes() for p in crashed.spool_files()}
        assert len(acknowledged) == len(study.files)
    finally:
        os.killpg(crashed.proc.pid, signal.SIGKILL)
        crashed.proc.wait(timeout=30)
    names = list(acknowledged)
    for path in names[::2]:
        (home / path).unlink()  # never reached the disk
    (home / names[1]).write_bytes(b"")  # its name did, its data did not
    restarted = Receiver(home)
    try:
        assert {p.relative_to(home): p.read_bytes() for p in restarted.spool_files()} == acknowledged
        lost = len(names[::2]) + 1
        assert f"replayed {lost} acknowledged instance(s) from the receive journal" in restarted.log()
        report = ingest_files(restarted.spool_files(), Archive.for_home(KaapanaHome(home)))
        assert report.count("indexed") == len(study.files)
    finally:
        restarted.stop()


@slow
@needs_dcmtk
def test_disallowed_ae_is_refused(receiver: Receiver, corpus: dict) -> None:
    refused = storescu(receiver.port, corpus["site-a"][0].ct_files[:2], calling="INTRUDER")
    assert refused.returncode != 0
    assert receiver.spool_files() == []
    time.sleep(0.3)
    assert "refused association from INTRUDER" in receiver.log()
    assert storescu(receiver.port, corpus["site-a"][0].ct_files[:1]).returncode == 0  # still serving


# dcmtk's storescu proposes one preferred transfer syntax per run (-x...), and the file's own
# syntax only through it: each encoding goes in its own run, as a PACS would send it.
STORESCU_PROPOSE = {"jpeg_lossless_sv1": "-xs", "jpeg2000_lossless": "-xv", "rle": "-xr", "jpeg_ls_lossless": "-xt",
                    "implicit_le": "-xi", "deflated": "-xd"}


@slow
@needs_dcmtk
@pytest.mark.tools("gdcmconv", "dcmcjpls")
def test_compressed_study_via_storescu_then_ingest(receiver: Receiver, corpus: dict, tmp_path: Path) -> None:
    """A study whose slices are JPEG Lossless SV1, JPEG 2000 lossless, RLE, JPEG-LS lossless
    (unsigned pixels: site-a), Implicit VR and Deflated Explicit VR Little Endian, plus its
    uncompressed SEG: stored byte for byte, in the syntax it was sent in, and indexed."""
    from kaapana_assets.synthetic.transcode import BY_NAME, transcode

    study = corpus["site-a"][0]
    scanned_ns = time.time_ns()  # the incoming sensor's scan before the study arrived
    encodings = list(STORESCU_PROPOSE)
    by_encoding: dict[str, list[Path]] = {e: [] for e in encodings}
    for i, f in enumerate(study.ct_files):
        e = encodings[i % len(encodings)]
        by_encoding[e].append(transcode(f, tmp_path / "sent" / e / f.name, e))
    for e, files in by_encoding.items():
        sent = storescu(receiver.port, files, propose=STORESCU_PROPOSE[e])
        assert sent.returncode == 0 and "Converting" not in sent.stdout + sent.stderr, sent.stdout + sent.stderr
    assert storescu(receiver.port, [study.seg_file]).returncode == 0
    sent_files = [f for files in by_encoding.values() for f in files] + [study.seg_file]

    received = receiver.spool_files()
    assert len(received) == len(sent_files) == len(study.ct_files) + 1
    by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received}
    syntaxes = set()
    for original in sent_files:
        ds = pydicom.dcmread(original, stop_before_pixels=True)
        stored = by_sop[ds.SOPInstanceUID]
        syntax = pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax == ds.file_meta.TransferSyntaxUID
        assert dataset_bytes(stored) == dataset_bytes(original)  # byte for byte
        syntaxes.add(str(syntax))
    assert syntaxes == {BY_NAME[e].transfer_syntax for e in encodings} | {ExplicitVRLittleEndian}
    # What a run started as the study arrived would ingest: every file the receiver wrote.
    settled = wait_until_quiet(receiver.home / "incoming", [study.study_uid], quiet_period_s=0.5, max_wait_s=30,
                               arrived_after_ns=scanned_ns)
    assert settled is not None and sorted(settled[study.study_uid]) == sorted(map(str, received))
    report = ingest_files(received, Archive.for_home(KaapanaHome(receiver.home)))
    assert report.summary()["indexed"] == len(sent_files), report.summary()
    assert "refused" not in receiver.log()


@slow
def test_malformed_dataset_is_refused(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom.association

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.10.1"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # The peer (pynetdicom's SCU, not our code) puts undecodable bytes on the wire.
    garbage = b"\x08\x00\x16\x00UI\xff\xff" + b"1.2.840" + b"\x08\x00\x18\x00UI\x10\x00"
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, **kwargs: garbage)
    ae = AE(ae_title="KAAPANA_TEST")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="KAAPANA")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210
    assert receiver.spool_files() == []
    assert "refused 1.2.826.0.1.3680043.10.1 from KAAPANA_TEST at 127.0.0.1: " in receiver.log()
    assert receiver.echo()


@slow
def test_aborted_association_leaves_nothing(receiver: Receiver) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.826.0.1.3680043.10.2"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = 4
    ds.PixelData = np.zeros((4, 512, 512), dtype=np.uint16).tobytes()  # 2 MiB: many P-DATA PDUs

    sent_pdus = []

    def cut_after_three(event):  # type: ignore[no-untyped-def]
        # The peer dies mid-transfer (a crash, a pulled cable): its socket closes after the
        # third data PDU, deterministically, while the data set is far from complete.
        if type(event.pdu).__name__ == "P_DATA_TF":
            sent_pdus.append(1)
            if len(sent_pdus) == 3:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    ae = AE(ae_title="KAAPANA_TEST")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="KAAPANA",
                         evt_handlers=[(evt.EVT_PDU_SENT, cut_after_three)])
    assert assoc.is_established
    try:
        assoc.send_c_store(ds)
    except Exception:  # noqa: BLE001 - the SCU sees its own broken connection in various ways
        pass
    assert len(sent_pdus) >= 3
    time.sleep(1.0)
    assert receiver.spool_files() == []  # nothing partial
    assert "aborted" in receiver.log()
    assert receiver.echo()


@slow
@needs_dcmtk
def test_send_seg_to_storescp(tmp_path: Path, corpus: dict) -> None:
    from kaapana_assets.cli import main

    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        seg = next(s for s in corpus["site-a"] if s.seg_file).seg_file
        home = tmp_path / "home"
        assert main(["send", str(seg), "--ae-title", "STORESCP", "--port", str(port), "--home", str(home)]) == 0
    finally:
        os.killpg(scp.pid, signal.SIGTERM)
        try:
            scp.wait(timeout=10)
        except subprocess.TimeoutExpired:  # storescp once ignored SIGTERM for 10 s in CI
            os.killpg(scp.pid, signal.SIGKILL)
            scp.wait(timeout=10)
    [received] = list(out.iterdir())
    assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(seg).SOPInstanceUID
    assert dciodvfy_errors(received) == []
    sent = Lake(home / "lake").read(SENT)
    assert sent.height == 1 and sent["status"][0] == "success" and sent["destination"][0].startswith("STORESCP@")


@slow
def test_send_retries_then_records_failure(tmp_path: Path, corpus: dict) -> None:
    from kaapana_assets.network.sender import DicomNode, record_sent, send_files

    node = DicomNode("NOBODY", "127.0.0.1", free_port())  # nothing listens there
    outcomes = send_files(corpus["site-a"][0].ct_files[:2], node, retries=2, backoff_s=0.05, timeout_s=2)
    assert all(o.status == "failed" and o.attempts == 2 and "no association" in (o.error or "") for o in outcomes)
    lake = Lake(tmp_path / "lake")
    record_sent(lake, outcomes, node)
    assert lake.read(SENT).filter(pl.col("status") == "failed").height == 2


@slow
@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -n to confine Orthanc to a private loopback")
@pytest.mark.tools(*orthanc.TOOLS)
def test_pull_from_orthanc_via_dicomweb(tmp_path: Path, corpus: dict) -> None:

    study = corpus["site-a"][1]
    out = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.scenarios.orthanc_pull", str(tmp_path), *map(str, study.ct_files)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["pull_exit"] == 0
    assert [m["study_uid"] for m in result["matches"]] == [study.study_uid]
    assert result["matches"][0]["patient_id"] == study.patient_id
    assert result["spooled"] == len(study.ct_files)
    assert result["ingest"]["indexed"] == len(study.ct_files) and result["studies"] == [study.study_uid]


# --- fast tier: the receiver's own encoders and its event-driven reactors, in process ---

@pytest.mark.parametrize(("sop_instance_uid", "calling"), [
    ("1.2.3.4", "STORESCU"),  # even lengths
    ("1.2.3.45", "MODALITY_X1"),  # odd lengths: UI padded with NUL, AE with a space
    ("1.2.840.113619.2.55.3.604688119.969.1268071029.320", "A"),
])
def test_file_meta_is_byte_for_byte_what_pydicom_writes(sop_instance_uid: str, calling: str) -> None:
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import create_file_meta

    from kaapana_assets.network.spool_writer import file_meta_bytes

    for transfer_syntax in (ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2"):
        meta = create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance_uid,
                                transfer_syntax=transfer_syntax)
        meta.SendingApplicationEntityTitle = calling
        meta.ReceivingApplicationEntityTitle = "KAAPANA"
        expected = io.BytesIO()
        write_file_meta_info(expected, meta, enforce_standard=True)  # type: ignore[arg-type]
        assert file_meta_bytes(CTImageStorage, sop_instance_uid, transfer_syntax, PYNETDICOM_IMPLEMENTATION_UID,
                               PYNETDICOM_IMPLEMENTATION_VERSION, calling, "KAAPANA") == expected.getvalue()


@pytest.mark.parametrize(("sop_instance_uid", "calling"), [
    ("1.2.3.x", "A"), ("1.2." + "3" * 70, "A"), ("", "A"),  # not a plain UID
    ("1.2.3", " A"), ("1.2.3", "A\\B"), ("1.2.3", "É"), ("1.2.3", ""), ("1.2.3", "A" * 17),  # not a plain AE title
])
def test_file_meta_leaves_unusual_values_to_pydicom(sop_instance_uid: str, calling: str) -> None:
    from kaapana_assets.network.spool_writer import file_meta_bytes

    assert file_meta_bytes(CTImageStorage, sop_instance_uid, ExplicitVRLittleEndian, "1.2.3", "V1", calling,
                           "KAAPANA") is None


def test_store_response_is_byte_for_byte_what_pynetdicom_encodes() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from kaapana_assets.network.pynetdicom_internals import store_response_command

    for sop_instance_uid, message_id, status in [("1.2.3.4", 1, 0x0000), ("1.2.3.45", 65535, 0xA900),
                                                 ("1.2.840.1.2.3", 7, 0xC210)]:
        response = C_STORE()
        response.MessageIDBeingRespondedTo = message_id
        response.AffectedSOPClassUID = CTImageStorage
        response.AffectedSOPInstanceUID = sop_instance_uid
        response.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(response)
        assert store_response_command(response) == encode(message.command_set, True, True)
    response.ErrorComment = "left to pynetdicom"
    assert store_response_command(response) is None


def test_event_driven_receiver_stores_parallel_associations(tmp_path: Path, corpus: dict) -> None:
    """Four associations at once through the event-driven reactors: every instance stored
    byte for byte with both AE titles; releases and an abort end the associations promptly."""
    from concurrent.futures import ThreadPoolExecutor

    from pynetdicom.dsutils import encode

    from kaapana_assets.network import receiver as receiver_module

    assert receiver_module.EVENT_DRIVEN, "the installed pynetdicom is not the one the reactor was taken from"
    spool, port = tmp_path / "incoming", free_port()
    server = receiver_module.start_receiver(spool, port=port)
    assert server is not None
    files = [f for study in corpus["site-a"] for f in study.ct_files][:24]

    def send(share: list[Path]) -> list[int]:
        ae = AE(ae_title="PARALLEL")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="KAAPANA")
        assert assoc.is_established
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in share]
        assoc.release()
        return statuses

    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            statuses = [s for part in pool.map(send, [files[i::4] for i in range(4)]) for s in part]
        assert statuses == [0] * len(files)
        # an association aborted by its peer ends promptly on our side too
        ae = AE(ae_title="PARALLEL")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="KAAPANA")
        assert assoc.is_established and assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
        assoc.abort()
        deadline = time.monotonic() + 5
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.active_associations
        assert time.monotonic() - t0 < 60
    finally:
        receiver_module.stop_receiver(server)
    stored = sorted(spool.rglob("*.dcm"))
    assert len(stored) == len(files)
    for f in files:
        ds = pydicom.dcmread(f)
        copy = spool / "PARALLEL" / f"{ds.SOPInstanceUID}.dcm"
        assert dataset_bytes(copy) == encode(ds, False, True)  # what send_c_store sent
        meta = pydicom.dcmread(copy, stop_before_pixels=True).file_meta
        assert (meta.SendingApplicationEntityTitle, meta.ReceivingApplicationEntityTitle) == ("PARALLEL", "KAAPANA")


def test_ingest_of_the_spool_reads_nothing_of_the_receiver(tmp_path: Path, corpus: dict) -> None:
    """What a user runs after `kaapana receive`: `kaapana ingest <home>/incoming`. The receive
    journal lives beside the spool, so the ingest indexes the instances and nothing else:
    no quarantine row, nothing copied into quarantine/."""
    from kaapana_assets.cli import main
    from kaapana_assets.lake.schemas import QUARANTINE
    from kaapana_assets.network import receiver as receiver_module
    from kaapana_assets.network.journal import journal_folder

    home, port = KaapanaHome(tmp_path / "home").ensure(), free_port()
    assert journal_folder(home.incoming) == home.receive_journal
    files = corpus["site-b"][0].ct_files[:4]
    server = receiver_module.start_receiver(home.incoming, port=port)
    assert server is not None
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="KAAPANA")
        assert [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files] == [0] * len(files)
        assoc.release()
    finally:
        receiver_module.stop_receiver(server)
    assert [p.name for p in home.receive_journal.glob("segment-*.wal")] == ["segment-0.wal"]
    assert main(["ingest", str(home.incoming), "--home", str(home.root)]) == 0
    assert Lake(home.lake).read(INSTANCES).height == len(files)
    assert Lake(home.lake).read(QUARANTINE).height == 0
    assert not any(home.quarantine.rglob("*"))

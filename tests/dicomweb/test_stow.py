"""STOW-RS into the spool through the C-STORE receiver's intake: dicomweb-client stores a study
through `kaapana dicomweb --stow` and the ingest indexes it; refused parts get the receiver's
failure codes in a FailedSOPSequence and leave the spool as it was; wrong content types,
oversized bodies; and (slow) Orthanc's own DICOMweb client pushes a study to us, which the
ingest then indexes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import polars as pl
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from starlette.testclient import TestClient

from bench import orthanc
from bench.dicomweb_server import DicomwebServer
from kaapana_assets.archive.service import Archive
from kaapana_assets.dicomweb.app import create_app
from kaapana_assets.dicomweb.config import DicomwebConfig
from kaapana_assets.dicomweb.stow import SENDER
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.ingest.spool import scan_spool
from kaapana_assets.lake.schemas import INSTANCES
from kaapana_assets.network.intake import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS
from kaapana_assets.synthetic import GeneratedStudy
from tests.helpers import REPO, can_unshare

MULTIPART = 'multipart/related; type="application/dicom"; boundary=BOUNDARY'
REFERENCED, FAILED, FAILURE_REASON, SOP_INSTANCE = "00081199", "00081198", "00081197", "00081155"


def _body(*parts: bytes, boundary: str = "BOUNDARY") -> bytes:
    out = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                   for p in parts)
    return out + b"--" + boundary.encode() + b"--\r\n"


def _spool(home: KaapanaHome) -> list[tuple[str, bytes]]:
    """Every file in the spool, the receive journal apart (it only ever holds stored instances)."""
    return sorted((f.path, Path(f.path).read_bytes()) for f in scan_spool(home.incoming))


def _dataset_bytes(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert ds.file_meta is not None
    return data[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]


@pytest.fixture
def stow_server(tmp_path: Path) -> Iterator[tuple[KaapanaHome, DicomwebServer]]:
    home = KaapanaHome(tmp_path / "home").ensure()
    server = DicomwebServer(home.root, ("--stow",))
    try:
        yield home, server
    finally:
        server.stop()


def test_dicomweb_client_stores_a_study_that_the_ingest_indexes(
        corpus: dict[str, list[GeneratedStudy]], stow_server: tuple[KaapanaHome, DicomwebServer]) -> None:
    home, server = stow_server
    study = corpus["site-b"][0]
    answer = DICOMwebClient(server.url).store_instances([pydicom.dcmread(f) for f in study.files])
    stored = {item.ReferencedSOPInstanceUID: item for item in answer.ReferencedSOPSequence}
    assert set(stored) == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in study.files}
    assert "FailedSOPSequence" not in answer
    first = pydicom.dcmread(study.ct_files[0], stop_before_pixels=True)
    assert stored[first.SOPInstanceUID].RetrieveURL == (f"{server.url}/studies/{study.study_uid}/series/"
                                                        f"{study.series_uid}/instances/{first.SOPInstanceUID}")
    spooled = _spool(home)
    assert len(spooled) == len(study.files) and {Path(p).parent.name for p, _ in spooled} == {SENDER}
    by_uid = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID: d for _, d in spooled}
    for f in study.files:
        original = f.read_bytes()
        arrived = by_uid[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID]
        # dicomweb-client re-encodes what pydicom read: the same data set, element for element
        assert pydicom.dcmread(io.BytesIO(arrived)) == pydicom.dcmread(io.BytesIO(original))
        assert pydicom.dcmread(io.BytesIO(arrived)).file_meta.SendingApplicationEntityTitle == SENDER
    server.stop()  # its journal's last checkpoint: every stored instance durable in the spool
    report = ingest_files([p for p, _ in spooled], Archive.for_home(home))
    assert report.count("indexed") == len(study.files), report.summary()
    indexed = Archive.for_home(home).lake.read(INSTANCES, pl.col("study_uid") == study.study_uid)
    assert indexed.height == len(study.files) and set(indexed["calling_ae_title"]) == {SENDER}


def test_refused_parts_get_the_receivers_codes_and_leave_the_spool_as_it_was(
        corpus: dict[str, list[GeneratedStudy]], stow_server: tuple[KaapanaHome, DicomwebServer]) -> None:
    home, server = stow_server
    study, other = corpus["site-a"][0], corpus["site-a"][1]
    slice_bytes = study.ct_files[0].read_bytes()
    # a file whose meta announces another instance than its data set holds (the first occurrence
    # of the UID is the file meta's; the same length keeps the group length right)
    uid = pydicom.dcmread(study.ct_files[1], stop_before_pixels=True).SOPInstanceUID.encode()
    announced_wrong = study.ct_files[1].read_bytes().replace(uid, uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2"), 1)

    def post(body: bytes, path: str = "/studies", content_type: str = MULTIPART) -> requests.Response:
        return requests.post(server.url + path, data=body, headers={"Content-Type": content_type,
                                                                     "Accept": "application/dicom+json"}, timeout=60)

    before = _spool(home)
    garbage = post(_body(b"\x00" * 132 + b"garbage" * 100, b"DICM is not enough"))
    assert garbage.status_code == 409 and garbage.headers["content-type"] == "application/dicom+json"
    failed = garbage.json()[FAILED]["Value"]
    assert [f[FAILURE_REASON]["Value"] for f in failed] == [[CANNOT_UNDERSTAND], [CANNOT_UNDERSTAND]]
    mismatch = post(_body(slice_bytes), f"/studies/{other.study_uid}")
    assert mismatch.status_code == 409
    [item] = mismatch.json()[FAILED]["Value"]
    assert item[FAILURE_REASON]["Value"] == [DATA_SET_DOES_NOT_MATCH_SOP_CLASS]
    assert item[SOP_INSTANCE]["Value"] == [pydicom.dcmread(study.ct_files[0], stop_before_pixels=True).SOPInstanceUID]
    wrong_uid = post(_body(announced_wrong))
    assert wrong_uid.status_code == 409
    assert wrong_uid.json()[FAILED]["Value"][0][FAILURE_REASON]["Value"] == [DATA_SET_DOES_NOT_MATCH_SOP_CLASS]
    for content_type in ("application/dicom", 'multipart/related; type="application/dicom+json"; boundary=BOUNDARY'):
        assert post(_body(slice_bytes), content_type=content_type).status_code == 415
    assert post(_body(slice_bytes), content_type='multipart/related; type="application/dicom"').status_code == 400
    assert post(b"no parts at all").status_code == 400
    assert _spool(home) == before == []  # nothing of a refused instance written
    assert "study_mismatch" in server.log() and "uid_mismatch" in server.log()  # each refusal logged

    # one good part among bad ones: 202, the good one stored, the bad one not
    mixed = post(_body(slice_bytes, b"junk"), f"/studies/{study.study_uid}")
    assert mixed.status_code == 202
    assert len(mixed.json()[REFERENCED]["Value"]) == 1 and len(mixed.json()[FAILED]["Value"]) == 1
    [(path, data)] = _spool(home)
    assert _dataset_bytes(data) == _dataset_bytes(slice_bytes)  # the data set byte for byte as sent


def test_a_body_beyond_the_limit_gets_413(corpus: dict[str, list[GeneratedStudy]], tmp_path: Path) -> None:
    home = KaapanaHome(tmp_path / "home").ensure()
    archive = Archive.for_home(home)
    config = DicomwebConfig(archive.lake, home.archive, home.incoming, stow=True, stow_max_bytes=8 * 1024)
    slices = [f.read_bytes() for f in corpus["site-a"][0].ct_files[:4]]
    with TestClient(create_app(config)) as client:
        declared = client.post("/dicom-web/studies", content=_body(*slices), headers={"Content-Type": MULTIPART})
        assert declared.status_code == 413 and "exceeds" in declared.text

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while it streams
            yield _body(*slices)

        streamed = client.post("/dicom-web/studies", content=chunked(), headers={"Content-Type": MULTIPART})
        assert streamed.status_code == 413
    assert _spool(home) == []


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_parts_are_read_wherever_the_stream_splits_them(chunk: int) -> None:
    """dicomweb-client's own encoding (a CRLF before the first delimiter, none after the last)
    and ours, cut into chunks of every size: the same parts, bytes that look like a delimiter
    inside a part included."""
    import asyncio

    from kaapana_assets.dicomweb.multipart import read_parts

    payloads = [b"one\r\n--BOUNDAR", b"", bytes(range(256)) * 8]
    bodies = [DICOMwebClient._encode_multipart_message(payloads, MULTIPART), _body(*payloads)]

    async def parts(body: bytes) -> list[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), chunk):
                yield body[start:start + chunk]

        return [p.body async for p in read_parts(chunks(), "BOUNDARY", 2**20, 2**20)]

    for body in bodies:
        assert asyncio.run(parts(body)) == payloads


# --- Orthanc pushes to us (slow: a real Orthanc in a private network namespace) -------------------


@pytest.mark.slow
@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -n to confine Orthanc to a private loopback")
@pytest.mark.tools(*orthanc.TOOLS)
def test_orthanc_pushes_a_study_with_stow_rs_and_it_is_indexed(corpus: dict[str, list[GeneratedStudy]],
                                                                tmp_path: Path) -> None:
    home = KaapanaHome(tmp_path / "home").ensure()
    study = corpus["site-b"][1]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"home": str(home.root), "files": [str(f) for f in study.files]}))
    out = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.dicomweb.test_stow", str(tmp_path),
                          str(manifest)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pushed = json.loads((tmp_path / "pushed.json").read_text())
    assert pushed["orthanc_answer"] is not None
    spooled = _spool(home)
    assert len(spooled) == len(study.files) and {Path(p).parent.name for p, _ in spooled} == {SENDER}
    for f in study.files:  # Orthanc sends the files as it stores them: the data sets byte for byte
        original = f.read_bytes()
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        [arrived] = [d for _, d in spooled if pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID
                     == uid]
        assert _dataset_bytes(arrived) == _dataset_bytes(original)
    report = ingest_files([p for p, _ in spooled], Archive.for_home(home))
    assert report.count("indexed") == len(study.files), report.summary()
    indexed = Archive.for_home(home).lake.read(INSTANCES, pl.col("study_uid") == study.study_uid)
    assert sorted(indexed["sop_instance_uid"]) == sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                                         for f in study.files)


def _in_namespace(workdir: Path, manifest: Path) -> None:
    """Inside `unshare -n`: our service with STOW-RS, and Orthanc with it as a DICOMweb server;
    the study uploaded to Orthanc, then pushed with Orthanc's STOW-RS client."""
    sys.path.insert(0, str(REPO))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from bench.orthanc import Orthanc

    spec = json.loads(manifest.read_text())
    ours = DicomwebServer(Path(spec["home"]), ("--stow",))
    pacs = None
    try:
        pacs = Orthanc(workdir / "orthanc", dicomweb_servers={"kaapana": ours.url + "/"})
        study_ids = {pacs.upload(Path(f))["ParentStudy"] for f in spec["files"]}
        answer = pacs.send("POST", "/dicom-web/servers/kaapana/stow", {"Resources": sorted(study_ids)})
        (workdir / "pushed.json").write_text(json.dumps({"orthanc_answer": answer, "log": ours.log()}))
    finally:
        if pacs is not None:
            pacs.stop()
        ours.stop()  # the journal's last checkpoint: the spool files durable


if __name__ == "__main__":
    _in_namespace(Path(sys.argv[1]), Path(sys.argv[2]))

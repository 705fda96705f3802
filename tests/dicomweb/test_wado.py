"""WADO-RS over an ingested site: a native CT study with its SEG, and two CT studies that
dcmtk and GDCM compressed (JPEG Lossless SV1, JPEG 2000 lossless). dicomweb-client retrieves
through `kaapana dicomweb` (uvicorn) and what comes back is checked against the archived files
as pydicom reads them; the status codes of bad requests; and (slow) the metadata of every
instance against Orthanc's DICOMweb plugin holding the same files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

from bench import orthanc
from bench.dicomweb_server import DicomwebServer
from kaapana_assets.archive.service import Archive
from kaapana_assets.dicomweb.metadata import dataset_json, instance_json, read_header
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake.schemas import INSTANCES
from kaapana_assets.synthetic import GeneratedStudy
from kaapana_assets.synthetic.transcode import transcode
from tests.helpers import REPO, can_unshare, pydicom_files

COMPRESSED = {"jpeg_lossless_sv1": "1.2.840.10008.1.2.4.70", "jpeg2000_lossless": "1.2.840.10008.1.2.4.90"}
pytestmark = pytest.mark.tools("dcmcjpeg", "gdcmconv")  # they compress two of the studies

MULTIPART_DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Served:
    home: KaapanaHome
    native: GeneratedStudy  # CT and SEG, Explicit VR Little Endian
    compressed: dict[str, str]  # encoding name → study UID (its CT series only)
    server: DicomwebServer
    client: DICOMwebClient

    def archived(self, study_uid: str) -> pl.DataFrame:
        return (Archive.for_home(self.home).lake.read(INSTANCES, pl.col("study_uid") == study_uid)
                .sort("series_uid", "instance_number"))

    def path(self, row: dict) -> Path:
        return self.home.archive / row["archive_path"]


@pytest.fixture(scope="module")
def served(corpus: dict[str, list[GeneratedStudy]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("wado")
    home = KaapanaHome(root / "home")
    native, *others = corpus["site-a"]  # unsigned pixels: every lossless encoder takes them
    files = list(native.files)
    compressed = {}
    for (name, _), study in zip(COMPRESSED.items(), others, strict=False):
        files += [transcode(f, root / name / f.name, name) for f in study.ct_files]
        compressed[name] = study.study_uid
    report = ingest_files(files, Archive.for_home(home), remove_sources=False)
    assert report.count("indexed") == len(files), report.summary()
    server = DicomwebServer(home.root)
    try:
        yield Served(home, native, compressed, server, DICOMwebClient(server.url))
    finally:
        server.stop()


def _same_elements(got: pydicom.Dataset, archived: Path) -> None:
    expected = pydicom.dcmread(archived)
    assert got.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID
    assert list(got.keys()) == list(expected.keys())
    for element in expected:
        assert got[element.tag] == element, element.tag


def test_study_as_stored_equals_the_archive_element_for_element(served: Served) -> None:
    rows = served.archived(served.native.study_uid)
    got = served.client.retrieve_study(served.native.study_uid, media_types=(("application/dicom", "*"),))
    assert len(got) == rows.height == len(served.native.files)
    by_uid = {ds.SOPInstanceUID: ds for ds in got}
    for row in rows.iter_rows(named=True):
        _same_elements(by_uid[row["sop_instance_uid"]], served.path(row))


def test_series_and_instance_default_to_explicit_vr_little_endian(served: Served) -> None:
    study_uid = served.compressed["jpeg2000_lossless"]
    rows = served.archived(study_uid)
    first = rows.row(0, named=True)
    series = served.client.retrieve_series(study_uid, first["series_uid"])  # no transfer syntax: PS3.18's default
    assert len(series) == rows.height
    for ds, row in zip(sorted(series, key=lambda d: int(d.InstanceNumber)), rows.iter_rows(named=True), strict=True):
        archived = pydicom.dcmread(served.path(row))
        assert archived.file_meta.TransferSyntaxUID == COMPRESSED["jpeg2000_lossless"]
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPInstanceUID == archived.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, archived.pixel_array)  # lossless: the same values
    instance = served.client.retrieve_instance(study_uid, first["series_uid"], first["sop_instance_uid"],
                                               media_types=(("application/dicom", "*"),))
    _same_elements(instance, served.path(first))


def test_series_metadata_carries_every_attribute_and_its_bulk_data(served: Served) -> None:
    rows = served.archived(served.native.study_uid)
    for series_uid in rows["series_uid"].unique():
        metadata = served.client.retrieve_series_metadata(served.native.study_uid, series_uid)
        members = rows.filter(pl.col("series_uid") == series_uid)
        assert len(metadata) == members.height
        for item, row in zip(metadata, members.iter_rows(named=True), strict=True):
            pixel_uri = item["7FE00010"]["BulkDataURI"]
            assert pixel_uri.endswith(f"/instances/{row['sop_instance_uid']}/bulk/7FE00010")
            expected = pydicom.dcmread(served.path(row))
            assert served.client.retrieve_bulkdata(pixel_uri) == [expected.PixelData]
            # pydicom rebuilds the rest, fetching any other BulkDataURI through dicomweb-client
            ds = pydicom.Dataset.from_json({k: v for k, v in item.items() if k != "7FE00010"},
                                           lambda uri: served.client.retrieve_bulkdata(uri)[0])
            assert set(ds.keys()) | {0x7FE00010} == set(expected.keys())
            for element in expected:
                if element.tag != 0x7FE00010:
                    assert ds[element.tag].value == element.value, element.tag


def test_metadata_encoder_equals_pydicoms_json(served: Served) -> None:
    """Our DICOM JSON, read straight from the bytes (or through pydicom for other syntaxes), is
    pydicom's own `to_json_dict` of the file, wherever binary values are aside."""
    rows = Archive.for_home(served.home).lake.read(INSTANCES)
    for row in rows.iter_rows(named=True):
        path = served.path(row)
        ours = instance_json(path, lambda tag_path: "bulk")
        pydicoms = pydicom.dcmread(path).to_json_dict(1024, lambda element: "bulk")
        assert {tag: _comparable(e) for tag, e in ours.items()} == \
            {tag: _comparable(e) for tag, e in pydicoms.items()}, row["archive_path"]


def test_the_byte_walker_equals_the_pydicom_path_on_pydicoms_files() -> None:
    """The hand-written Explicit VR LE reader (kept because cold metadata is ×2–3 faster with it,
    `make bench-wado`) gives the same JSON as the pydicom path, on every file pydicom ships that it
    reads: other syntaxes, private and nested sequences, odd character sets, padding, group lengths."""
    compared = 0
    for path in pydicom_files():
        try:
            expected = dataset_json(read_header(path), lambda tag_path: "bulk")
        except Exception:  # noqa: BLE001 - files pydicom's own tests expect to fail reading
            continue
        assert instance_json(path, lambda tag_path: "bulk") == expected, path.name
        compared += 1
    assert compared > 150


def test_frames_native_and_as_stored(served: Served) -> None:
    native = served.archived(served.native.study_uid).filter(pl.col("modality") == "CT").row(0, named=True)
    archived = pydicom.dcmread(served.path(native))
    [frame] = served.client.retrieve_instance_frames(native["study_uid"], native["series_uid"],
                                                     native["sop_instance_uid"], [1])
    assert frame == archived.PixelData

    seg = served.archived(served.native.study_uid).filter(pl.col("modality") == "SEG").row(0, named=True)
    seg_ds = pydicom.dcmread(served.path(seg))
    per_frame = seg_ds.Rows * seg_ds.Columns // 8  # bit-packed, byte-aligned on this grid
    frames = served.client.retrieve_instance_frames(seg["study_uid"], seg["series_uid"], seg["sop_instance_uid"],
                                                    [2, 1])
    assert frames == [seg_ds.PixelData[per_frame:2 * per_frame], seg_ds.PixelData[:per_frame]]

    for name, syntax in COMPRESSED.items():
        row = served.archived(served.compressed[name]).row(0, named=True)
        stored = pydicom.dcmread(served.path(row))
        [codestream] = list(generate_frames(stored.PixelData, number_of_frames=1))
        media = "image/jpeg" if name.startswith("jpeg_") else "image/jp2"
        args = (row["study_uid"], row["series_uid"], row["sop_instance_uid"], [1])
        assert served.client.retrieve_instance_frames(*args, media_types=((media, syntax),)) == [codestream]
        assert served.client.retrieve_instance_frames(*args) == [codestream]  # */*: as stored
        [decoded] = served.client.retrieve_instance_frames(*args, media_types=("application/octet-stream",))
        assert decoded == stored.pixel_array.astype("<u2").tobytes()


def test_rendered_and_thumbnail(served: Served) -> None:
    row = served.archived(served.native.study_uid).filter(pl.col("modality") == "CT").row(0, named=True)
    ds = pydicom.dcmread(served.path(row))
    png = served.client.retrieve_instance_rendered(row["study_uid"], row["series_uid"], row["sop_instance_uid"],
                                                   media_types=("image/png",))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (ds.Columns, ds.Rows)
    assert len(set(np.asarray(image).ravel().tolist())) > 1  # windowed, not blank
    series = f"{served.server.url}/studies/{row['study_uid']}/series/{row['series_uid']}"
    thumbnail = requests.get(f"{series}/thumbnail", headers={"Accept": "image/jpeg"}, timeout=30)
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 128
    rendered = requests.get(f"{series}/rendered", params={"viewport": "64,64"}, timeout=30)
    assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/jpeg"  # the default
    assert max(Image.open(io.BytesIO(rendered.content)).size) <= 64


@pytest.mark.parametrize(("path", "accept", "status"), [
    ("/studies/1.2.3", MULTIPART_DICOM_ANY, 404),
    ("/studies/{study}/series/1.2.3/metadata", "application/dicom+json", 404),
    ("/studies/{study}/series/{series}/instances/1.2.3/frames/1", "*/*", 404),
    ("/studies/{study}/series/{series}/instances/{instance}/frames/2", "*/*", 404),
    ("/studies/not-a-uid", MULTIPART_DICOM_ANY, 400),
    ("/studies/{study}/series/{series}/instances/{instance}/frames/0", "*/*", 400),
    ("/studies/{study}/series/{series}/instances/{instance}/frames/one", "*/*", 400),
    ("/studies/{study}/series/{series}/instances/{instance}/bulk/zz", "*/*", 400),
    ("/studies/{study}", 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90', 406),
    ("/studies/{study}/metadata", "text/html", 406),
    ("/studies/{study}/series/{series}/instances/{instance}/frames/1", 'multipart/related; type="image/jpeg"', 406),
    ("/studies/{study}/series/{series}/rendered", "image/gif", 406),
])
def test_bad_requests_get_the_standard_status(served: Served, path: str, accept: str, status: int) -> None:
    row = served.archived(served.native.study_uid).filter(pl.col("modality") == "CT").row(0, named=True)
    url = served.server.url + path.format(study=row["study_uid"], series=row["series_uid"],
                                          instance=row["sop_instance_uid"])
    response = requests.get(url, headers={"Accept": accept}, timeout=30)
    assert response.status_code == status, response.text


# --- parity with Orthanc (slow: a real Orthanc in a private network namespace) -------------------

# Where Orthanc's DICOMweb plugin and we differ on purpose: where binary values are (BulkDataURI
# against InlineBinary: the URLs are each server's own).
BINARY_KEYS = ("BulkDataURI", "InlineBinary")
PIXEL_DATA = "7FE00010"


def _comparable(element: dict) -> dict:
    out = {k: v for k, v in element.items() if k not in BINARY_KEYS}
    if "Value" in out and element.get("vr") == "SQ":
        out["Value"] = [{tag: _comparable(e) for tag, e in item.items()} for item in out["Value"]]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -n to confine Orthanc to a private loopback")
@pytest.mark.tools(*orthanc.TOOLS)
def test_metadata_equals_orthancs_for_every_instance(served: Served, tmp_path: Path) -> None:
    rows = Archive.for_home(served.home).lake.read(INSTANCES)
    files = [str(served.home.archive / p) for p in rows["archive_path"]]
    series = sorted(set(zip(rows["study_uid"], rows["series_uid"], strict=True)))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"home": str(served.home.root), "files": files, "series": series}))
    out = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.dicomweb.test_wado", str(tmp_path),
                          str(manifest)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    syntax_of = dict(zip(rows["sop_instance_uid"], rows["transfer_syntax_uid"], strict=True))
    compared = 0
    for ours, theirs in zip(answers["ours"], answers["orthanc"], strict=True):
        assert len(ours) == len(theirs) > 0
        theirs_by_uid = {item["00080018"]["Value"][0]: item for item in theirs}
        for item in ours:
            other = theirs_by_uid[item["00080018"]["Value"][0]]
            sop_uid = item["00080018"]["Value"][0]
            # Orthanc leaves out the PixelData of encapsulated instances; we give it as every
            # other bulk value, a BulkDataURI (whose answer is the frames as stored)
            expected_extra = {PIXEL_DATA} if UID(syntax_of[sop_uid]).is_encapsulated else set()
            assert set(item) - set(other) == expected_extra and set(other) <= set(item), set(item) ^ set(other)
            for tag in other:
                assert _comparable(item[tag]) == _comparable(other[tag]), (tag, item[tag], other[tag])
                # both give the binary value somewhere, or both have none
                assert any(k in item[tag] for k in BINARY_KEYS) == any(k in other[tag] for k in BINARY_KEYS), tag
            compared += 1
    assert compared == rows.height


def _in_namespace(workdir: Path, manifest: Path) -> None:
    """Inside `unshare -n`: Orthanc with the files uploaded and our service over the home, each
    asked for every series' metadata."""
    sys.path.insert(0, str(REPO))
    from bench.dicomweb_server import beside_orthanc

    spec = json.loads(manifest.read_text())
    with beside_orthanc(Path(spec["home"]), spec["files"], workdir / "orthanc") as (ours, pacs):
        answers: dict[str, list] = {"ours": [], "orthanc": []}
        for study_uid, series_uid in spec["series"]:
            path = f"/studies/{study_uid}/series/{series_uid}/metadata"
            for name, base in (("ours", ours.url), ("orthanc", f"{pacs.url}/dicom-web")):
                response = requests.get(base + path, headers={"Accept": "application/dicom+json"}, timeout=60)
                response.raise_for_status()
                answers[name].append(response.json())
        (workdir / "answers.json").write_text(json.dumps(answers))


if __name__ == "__main__":
    _in_namespace(Path(sys.argv[1]), Path(sys.argv[2]))

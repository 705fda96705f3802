"""QIDO-RS over an ingested synthetic site (two sites' studies, each a CT series and its SEG):
the answers are checked against the files as pydicom reads them, through the app in process
and through `kaapana dicomweb` (uvicorn) with dicomweb-client; every malformed request gets
its status code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from starlette.testclient import TestClient

from bench.dicomweb_server import DicomwebServer
from kaapana_assets.archive.service import Archive
from kaapana_assets.dicomweb.app import create_app
from kaapana_assets.dicomweb.config import DicomwebConfig
from kaapana_assets.dicomweb.search import Index, S, Scope, parse_query, search
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import STUDIES
from kaapana_assets.projects.membership import ProjectScope
from kaapana_assets.synthetic import GeneratedStudy, generate_site
from tests.helpers import SMALL

DICOM_JSON = {"Accept": "application/dicom+json"}
STUDY_DEFAULTS = {"00080020", "00080030", "00080050", "00080061", "00080090", "00081190", "00100010", "00100020",
                  "00100030", "00100040", "0020000D", "00200010", "00201206", "00201208"}
SERIES_DEFAULTS = {"00080060", "0008103E", "0020000E", "00200011", "00201209"}
INSTANCE_DEFAULTS = {"00080016", "00080018", "00200013", "00280010", "00280011", "00280100"}


@dataclass(frozen=True)
class Site:
    home: KaapanaHome
    studies: list[GeneratedStudy]
    client: TestClient


@pytest.fixture(scope="module")
def site(corpus: dict[str, list[GeneratedStudy]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = KaapanaHome(tmp_path_factory.mktemp("qido") / "home")
    archive = Archive.for_home(home)
    studies = [s for site_studies in corpus.values() for s in site_studies]
    report = ingest_files([f for s in studies for f in s.files], archive, remove_sources=False)
    assert report.versions["studies"] is not None
    with TestClient(create_app(DicomwebConfig(archive.lake, home.archive, home.incoming))) as client:
        yield Site(home, studies, client)


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _get(site: Site, path: str, **params: str | list[str]) -> list[dict]:
    response = site.client.get("/dicom-web" + path, params=params, headers=DICOM_JSON)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    return response.json()


def _values(objects: list[dict], key: str) -> list:
    return [v for o in objects for v in o.get(key, {}).get("Value", [])]


def test_studies_carry_the_default_attributes_as_the_files_hold_them(site: Site) -> None:
    found = {o["0020000D"]["Value"][0]: o for o in _get(site, "/studies")}
    assert set(found) == {s.study_uid for s in site.studies}
    for study in site.studies:
        ds = _header(study.ct_files[0])
        got = found[study.study_uid]
        assert set(got) == STUDY_DEFAULTS
        assert got["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": str(ds.PatientName)}]}
        assert "^" in str(ds.PatientName)
        assert got["00100020"]["Value"] == [ds.PatientID] and got["00080020"]["Value"] == [ds.StudyDate]
        assert got["00080030"]["Value"] == [ds.StudyTime] and got["00200010"]["Value"] == [ds.StudyID]
        assert got["00080050"]["Value"] == [ds.AccessionNumber]
        assert got["00080090"] == {"vr": "PN"}  # ReferringPhysicianName: present, empty (type 2)
        assert got["00080061"]["Value"] == ["CT", "SEG"]
        assert got["00201206"] == {"vr": "IS", "Value": [2]}
        assert got["00201208"] == {"vr": "IS", "Value": [len(study.files)]}
        assert got["00081190"]["Value"] == [f"http://testserver/dicom-web/studies/{study.study_uid}"]


def test_a_study_shared_between_projects_counts_only_the_readers_series(site: Site) -> None:
    """Project A holds a study's CT series, project B its SEG: A's reader gets the study with
    one series, the CT's instances and modality CT, and a search on SEG does not find it.
    The admin's answer counts both."""
    study = site.studies[0]
    lake = Lake(site.home.lake)
    ct_only = ProjectScope(projects=frozenset({"a"}), series_uids=frozenset({study.series_uid}),
                           study_uids=frozenset({study.study_uid}), version=None)
    index = Index(lake)

    def studies(allowed: ProjectScope | None, *filters: tuple[str, str]) -> dict[str, dict]:
        query = parse_query([*filters, ("includefield", "all")], S)
        return {o["0020000D"]["Value"][0]: o for o in json.loads(
            search(index, S, query, Scope(), "http://testserver", allowed))}

    ct_modalities = {_header(f).Modality for f in study.ct_files}
    seen = studies(ct_only)[study.study_uid]
    assert seen["00080061"]["Value"] == sorted(ct_modalities) == ["CT"]
    assert seen["00201206"]["Value"] == [1]
    assert seen["00201208"]["Value"] == [len(study.ct_files)]
    assert studies(ct_only, ("ModalitiesInStudy", "SEG")) == {}
    assert set(studies(ct_only)) == {study.study_uid}
    full = studies(None)[study.study_uid]
    assert full["00080061"]["Value"] == ["CT", "SEG"] and full["00201206"]["Value"] == [2]
    assert full["00201208"]["Value"] == [len(study.files)]
    assert study.study_uid in studies(None, ("ModalitiesInStudy", "SEG"))


def test_series_and_instances_of_a_study(site: Site) -> None:
    study = site.studies[0]
    series = {o["0020000E"]["Value"][0]: o for o in _get(site, f"/studies/{study.study_uid}/series")}
    assert set(series) == {study.series_uid, study.seg_series_uid}
    assert study.seg_file is not None
    seg = _header(study.seg_file)
    assert series[study.seg_series_uid]["00080060"]["Value"] == ["SEG"]
    assert series[study.seg_series_uid]["00200011"]["Value"] == [seg.SeriesNumber]
    assert series[study.series_uid]["00201209"]["Value"] == [len(study.ct_files)]
    # A series' answer carries its study's attributes, as Orthanc's does; not the study's counts.
    assert set(series[study.series_uid]) == (STUDY_DEFAULTS - {"00080061", "00201206", "00201208"}) | SERIES_DEFAULTS

    instances = _get(site, f"/studies/{study.study_uid}/series/{study.series_uid}/instances")
    expected = {_header(f).SOPInstanceUID: _header(f) for f in study.ct_files}
    assert {o["00080018"]["Value"][0] for o in instances} == set(expected)
    for o in instances:
        ds = expected[o["00080018"]["Value"][0]]
        assert o["00200013"]["Value"] == [ds.InstanceNumber] and o["00280010"]["Value"] == [ds.Rows]
        assert o["00280100"]["Value"] == [ds.BitsAllocated]
        assert "00280008" not in o  # NumberOfFrames: absent from a single-frame CT, so left out
    seg_instance = _get(site, f"/studies/{study.study_uid}/series/{study.seg_series_uid}/instances")
    assert [o["00280008"]["Value"] for o in seg_instance] == [[seg.NumberOfFrames]]
    across = _get(site, f"/studies/{study.study_uid}/instances")
    assert len(across) == len(study.files)


def _study_uids(site: Site, **params: str | list[str]) -> set[str]:
    return set(_values(_get(site, "/studies", **params), "0020000D"))


def test_attribute_matching(site: Site) -> None:
    headers = {s.study_uid: _header(s.ct_files[0]) for s in site.studies}
    first = site.studies[0]
    ds = headers[first.study_uid]
    everything = set(headers)
    # single value, by keyword and by tag
    assert _study_uids(site, PatientID=ds.PatientID) == {u for u, h in headers.items() if h.PatientID == ds.PatientID}
    assert _study_uids(site, **{"00100020": ds.PatientID}) == _study_uids(site, PatientID=ds.PatientID)
    # wildcards; person names case-insensitively
    assert _study_uids(site, PatientName="phantom^*") == everything
    assert _study_uids(site, PatientName=str(ds.PatientName)[:-1] + "?") == {
        u for u, h in headers.items() if str(h.PatientName)[:-1] == str(ds.PatientName)[:-1]}
    assert _study_uids(site, PatientID="NOBODY*") == set()
    # date ranges, closed and open
    dates = sorted(h.StudyDate for h in headers.values())
    low, high = dates[1], dates[-2]
    assert _study_uids(site, StudyDate=f"{low}-{high}") == {u for u, h in headers.items() if low <= h.StudyDate <= high}
    assert _study_uids(site, StudyDate=f"{low}-") == {u for u, h in headers.items() if h.StudyDate >= low}
    assert _study_uids(site, StudyDate=f"-{low}") == {u for u, h in headers.items() if h.StudyDate <= low}
    assert _study_uids(site, StudyDate=dates[0]) == {u for u, h in headers.items() if h.StudyDate == dates[0]}
    assert _study_uids(site, StudyTime="0900-1000") == everything  # 093000 lies between
    # UID lists
    pair = {site.studies[0].study_uid, site.studies[-1].study_uid}
    assert _study_uids(site, StudyInstanceUID=",".join(sorted(pair))) == pair
    # a multi-valued attribute matches on any of its values
    assert _study_uids(site, ModalitiesInStudy="SEG") == everything
    assert _study_uids(site, ModalitiesInStudy="MR") == set()
    # several keys: all must match
    assert _study_uids(site, PatientID=ds.PatientID, StudyDate=ds.StudyDate) == {
        u for u, h in headers.items() if h.PatientID == ds.PatientID and h.StudyDate == ds.StudyDate}
    # across the hierarchy: series and instances by their own and their study's attributes
    segs = _get(site, "/series", Modality="SEG")
    assert set(_values(segs, "0020000E")) == {s.seg_series_uid for s in site.studies}
    assert set(_values(_get(site, "/series", PatientID=ds.PatientID), "0020000D")) == _study_uids(
        site, PatientID=ds.PatientID)
    sops = [str(_header(f).SOPInstanceUID) for f in first.ct_files[:2]]
    assert set(_values(_get(site, "/instances", SOPInstanceUID=",".join(sops)), "00080018")) == set(sops)
    assert _values(_get(site, f"/studies/{first.study_uid}/series/{first.series_uid}/instances", InstanceNumber="2"),
                   "00200013") == [2]


def test_includefield_and_paging(site: Site) -> None:
    study = site.studies[0]
    ds = _header(study.ct_files[0])
    described = _get(site, "/studies", StudyInstanceUID=study.study_uid, includefield="StudyDescription")
    assert described[0]["00081030"]["Value"] == [ds.StudyDescription]
    # repeated, comma lists, tags; a matching key is returned too
    both = _get(site, "/series", SeriesInstanceUID=study.series_uid, includefield=["00080021,BodyPartExamined",
                                                                                   "Manufacturer"])
    assert both[0]["00080021"]["Value"] == [ds.SeriesDate] and both[0]["00180015"]["Value"] == [ds.BodyPartExamined]
    assert both[0]["00080070"]["Value"] == [ds.Manufacturer]
    everything = _get(site, f"/studies/{study.study_uid}/series/{study.series_uid}/instances", includefield="all")
    assert everything[0]["00280030"]["Value"] == [float(v) for v in ds.PixelSpacing]  # PixelSpacing, DS as numbers
    # universal matching: an empty value matches everything and returns the attribute
    universal = _get(site, "/studies", StudyDescription="")
    assert len(universal) == len(site.studies) and all(o["00081030"]["Value"] for o in universal)
    # a dictionary attribute the index does not hold: left out, with a Warning
    response = site.client.get("/dicom-web/studies", params={"includefield": "PatientWeight"}, headers=DICOM_JSON)
    assert response.status_code == 200 and "PatientWeight" in response.headers["warning"]
    assert all("00101030" not in o for o in response.json())

    everything_uids = [o["0020000D"]["Value"][0] for o in _get(site, "/studies")]
    pages = [_values(_get(site, "/studies", limit="4", offset=str(offset)), "0020000D") for offset in (0, 4, 8)]
    assert [len(p) for p in pages] == [4, len(everything_uids) - 4, 0]
    assert pages[0] + pages[1] == everything_uids  # a stable order: pages neither overlap nor skip
    assert _get(site, "/studies", limit="0") == []


@pytest.mark.parametrize(("path", "params", "accept", "status"), [
    ("/studies", {"NoSuchKeyword": "x"}, None, 400),
    ("/studies", {"7FE00010": "x"}, None, 400),  # PixelData: a dictionary tag the index does not search
    ("/studies", {"FFFF0001": "x"}, None, 400),  # not in the dictionary
    ("/studies", {"Modality": "CT"}, None, 400),  # a series attribute in a study search
    ("/studies", {"ReferencedSeriesSequence.SeriesInstanceUID": "1.2"}, None, 400),
    ("/studies", {"StudyDate": "2024"}, None, 400),
    ("/studies", {"StudyDate": "20240101-2024"}, None, 400),
    ("/studies", {"StudyDate": "-"}, None, 400),
    ("/studies", {"StudyTime": "9am"}, None, 400),
    ("/studies", {"StudyInstanceUID": "1.2.3,not-a-uid"}, None, 400),
    ("/series", {"SeriesNumber": "two"}, None, 400),
    ("/studies", {"limit": "x"}, None, 400),
    ("/studies", {"limit": "-1"}, None, 400),
    ("/studies", {"offset": "1.5"}, None, 400),
    ("/studies", {"fuzzymatching": "true"}, None, 400),
    ("/studies", {"fuzzymatching": "maybe"}, None, 400),
    ("/studies", {"includefield": "NoSuchKeyword"}, None, 400),
    ("/studies/not-a-uid/series", {}, None, 400),
    ("/studies/1.2.3/series", {}, None, 404),
    ("/studies/1.2.3/instances", {}, None, 404),
    ("/studies/{study}/series/1.2.3/instances", {}, None, 404),
    ("/studies/{study}/series/{other_series}/instances", {}, None, 404),  # a series of another study
    ("/studies", {}, "application/dicom+xml", 406),
    ("/studies", {}, "text/html", 406),
    ("/studies", {}, "application/dicom+json;q=0, application/json;q=0", 406),
    ("/studies", {"fuzzymatching": "false"}, "application/json", 200),
    ("/studies", {}, "*/*", 200),
    ("/studies", {}, "text/html, application/*;q=0.5", 200),
])
def test_status_codes(site: Site, path: str, params: dict, accept: str | None, status: int) -> None:
    path = path.format(study=site.studies[0].study_uid, other_series=site.studies[1].series_uid)
    response = site.client.get("/dicom-web" + path, params=params, headers={"Accept": accept} if accept else {})
    assert response.status_code == status, response.text
    if status != 200:
        assert response.headers["content-type"].startswith("text/plain") and response.text  # says why
    else:
        assert response.headers["content-type"].split(";")[0] in ("application/dicom+json", "application/json")


def test_read_only_without_stow(site: Site) -> None:
    """Without --stow the service has no STOW-RS route: a store is refused, nothing written."""
    response = site.client.post("/dicom-web/studies", content=b"--x--", headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert response.status_code == 405
    assert not any(site.home.incoming.rglob("*.dcm"))


def test_answers_follow_the_index_and_read_an_older_lake(tmp_path: Path) -> None:
    """A study ingested while the service runs is found by the next search (the cache follows
    the Delta version); a `studies` table written before StudyTime/StudyID were indexed is
    answered, those attributes empty, until its next MERGE fills them."""
    from deltalake import write_deltalake

    home = KaapanaHome(tmp_path / "home")
    archive = Archive.for_home(home)
    old_schema = pa.schema([f for f in STUDIES.schema if f.name not in ("study_time", "study_id",
                                                                         "referring_physician_name")])
    write_deltalake(archive.lake.uri(STUDIES), pa.Table.from_pylist(
        [{"study_uid": "1.2.3", "patient_id": "OLD", "modalities": ["CT"], "series_count": 1, "instance_count": 1}],
        schema=old_schema))
    client = TestClient(create_app(DicomwebConfig(archive.lake, home.archive, home.incoming)))
    old = client.get("/dicom-web/studies", headers=DICOM_JSON).json()
    assert [(o["00100020"]["Value"], o["00080030"], o["00200010"]) for o in old] == [
        (["OLD"], {"vr": "TM"}, {"vr": "SH"})]

    study = generate_site("site-c", 1, seed=5, out=tmp_path / "data", **SMALL)[0]
    ingest_files(study.files, archive, remove_sources=False)
    found = {o["0020000D"]["Value"][0]: o for o in client.get("/dicom-web/studies", headers=DICOM_JSON).json()}
    assert set(found) == {"1.2.3", study.study_uid}
    assert found[study.study_uid]["00080030"]["Value"] == [_header(study.ct_files[0]).StudyTime]


def test_dicomweb_client_through_kaapana_dicomweb(site: Site) -> None:
    """dicomweb-client (nobody here wrote it) against `kaapana dicomweb` served by uvicorn."""
    server = DicomwebServer(site.home.root)
    try:
        client = DICOMwebClient(server.url)
        study = site.studies[0]
        ds = _header(study.ct_files[0])
        studies = client.search_for_studies(search_filters={"PatientID": ds.PatientID}, fields=["StudyDescription"])
        assert {s["0020000D"]["Value"][0] for s in studies} == {
            s.study_uid for s in site.studies if _header(s.ct_files[0]).PatientID == ds.PatientID}
        assert all(s["00081030"]["Value"] == [ds.StudyDescription] for s in studies)
        # RetrieveURL names the host the request named (dicomweb-client sends Host without the port)
        assert studies[0]["00081190"]["Value"] == [
            f"http://127.0.0.1/dicom-web/studies/{studies[0]['0020000D']['Value'][0]}"]
        everything = client.search_for_studies()
        paged = client.search_for_studies(limit=2, offset=1)
        assert [s["0020000D"] for s in paged] == [s["0020000D"] for s in everything[1:3]]
        series = client.search_for_series(study.study_uid, search_filters={"Modality": "SEG"})
        assert [s["0020000E"]["Value"][0] for s in series] == [study.seg_series_uid]
        assert len(client.search_for_series(search_filters={"Modality": "CT"})) == len(site.studies)
        instances = client.search_for_instances(study.study_uid, study.series_uid, fields=["all"], limit=3)
        assert [i["00200013"]["Value"][0] for i in instances] == [1, 2, 3]
        assert len(client.search_for_instances(search_filters={"PatientID": ds.PatientID})) == sum(
            len(s.files) for s in site.studies if _header(s.ct_files[0]).PatientID == ds.PatientID)
    finally:
        server.stop()


def test_values_are_encoded_as_dicom_json(tmp_path: Path) -> None:
    """Person name groups, text that looks like JSON, absent values: PS3.18 F.2 as json.loads
    reads it (the page is encoded by polars, nulls cut from the text)."""
    from kaapana_assets.lake import Lake

    lake = Lake(tmp_path / "lake")
    tricky = 'A "quoted", \\"Value\\":null, ,"Value":null\\ \u00e9'
    lake.merge(STUDIES, pa.Table.from_pylist([
        {"study_uid": "1.2.3", "patient_name": "Yamada^Tarou=山田^太郎=やまだ^たろう", "study_description": tricky,
         "modalities": [], "series_count": 0, "instance_count": 0, "row_digest": "a"},
        {"study_uid": "1.2.4", "patient_name": "=山田^太郎", "row_digest": "b"},
    ], schema=STUDIES.schema))
    client = TestClient(create_app(DicomwebConfig(lake, tmp_path / "archive", tmp_path / "incoming")))
    found = client.get("/dicom-web/studies", params={"includefield": "StudyDescription"}, headers=DICOM_JSON).json()
    first, second = found
    assert first["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                           "Phonetic": "やまだ^たろう"}]
    assert first["00081030"]["Value"] == [tricky]
    assert first["00080061"] == {"vr": "CS"} and first["00201206"] == {"vr": "IS", "Value": [0]}
    assert second["00100010"]["Value"] == [{"Ideographic": "山田^太郎"}]
    assert second["00081030"] == {"vr": "LO"} and second["00080020"] == {"vr": "DA"}
    assert client.get("/dicom-web/studies", params={"PatientName": "yamada^*"}, headers=DICOM_JSON).json()[0][
        "0020000D"]["Value"] == ["1.2.3"]

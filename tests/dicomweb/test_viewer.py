"""The viewer's side of the service without a browser: links into it, OHIF's build served at
"/" with its client routes, and the generated app-config.js as node evaluates it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kaapana_assets.dicom.uids import InvalidUID
from kaapana_assets.dicomweb.app import create_app
from kaapana_assets.dicomweb.config import DICOMWEB_ROOT, DicomwebConfig
from kaapana_assets.dicomweb.links import SegView, viewer_url
from kaapana_assets.dicomweb.viewer import DICOMWEB_DATA_SOURCE, app_config
from kaapana_assets.lake import Lake
from tests.helpers import ViewerLink, viewer_link

STUDY, CT, SEG = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
INDEX = "<!doctype html><title>OHIF Viewer</title><script src=\"/app-config.js\"></script>"


def test_a_study_link_and_a_seg_link() -> None:
    assert viewer_link(viewer_url("http://127.0.0.1:8080", STUDY)) == ViewerLink(
        "http://127.0.0.1:8080", "/viewer", {"StudyInstanceUIDs": [STUDY]})
    # A SEG: segmentation mode, only the SEG and its images loaded, OHIF's SEG protocol hangs it.
    # Behind a path prefix, with or without its trailing slash: the same route under it.
    seg = SegView(seg_series_uid=SEG, image_series_uid=CT)
    assert viewer_url("https://pacs.example.org/ohif/", STUDY, seg) == viewer_url("https://pacs.example.org/ohif", STUDY, seg)
    assert viewer_link(viewer_url("https://pacs.example.org/ohif", STUDY, seg)) == ViewerLink(
        "https://pacs.example.org", "/ohif/segmentation",
        {"StudyInstanceUIDs": [STUDY], "SeriesInstanceUIDs": [f"{CT},{SEG}"], "hangingProtocolId": ["@ohif/seg"]})


@pytest.mark.parametrize("study_uid", ["1.2.3&StudyInstanceUIDs=9", "../1.2", "", "1." + "2" * 70])
def test_a_uid_from_a_file_never_shapes_the_link(study_uid: str) -> None:
    with pytest.raises(InvalidUID, match="StudyInstanceUID"):
        viewer_url("http://127.0.0.1:8080", study_uid)
    with pytest.raises(InvalidUID, match="SeriesInstanceUID"):
        viewer_url("http://127.0.0.1:8080", STUDY, SegView(seg_series_uid=study_uid, image_series_uid=CT))
    with pytest.raises(InvalidUID, match="SeriesInstanceUID"):
        viewer_url("http://127.0.0.1:8080", STUDY, SegView(seg_series_uid=SEG, image_series_uid=study_uid))


@pytest.mark.parametrize("base", ["127.0.0.1:8080", "javascript:alert(1)", "http://", "http://h/?a=1", "ftp://h"])
def test_a_base_that_is_not_an_http_url_is_refused(base: str) -> None:
    with pytest.raises(ValueError, match="base URL"):
        viewer_url(base, STUDY)


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX)
    (dist / "app.bundle.js").write_text("console.log('ohif')")
    (dist / "app-config.js").write_text("window.config = {dataSources: []};  // OHIF's demo server")
    config = DicomwebConfig(lake=Lake(tmp_path / "lake"), archive=tmp_path / "archive", incoming=tmp_path / "incoming",
                            viewer_dir=dist)
    return TestClient(create_app(config))


def test_the_build_is_served_at_the_root_with_its_client_routes(client: TestClient) -> None:
    assert client.get("/").text == INDEX
    assert client.get("/app.bundle.js").text == "console.log('ohif')"
    # OHIF's router owns these paths: the page loads, OHIF reads the route and query.
    for route in (f"/viewer?StudyInstanceUIDs={STUDY}", f"/segmentation?StudyInstanceUIDs={STUDY}", "/local"):
        response = client.get(route)
        assert response.status_code == 200 and response.text == INDEX, route
    # A missing file stays missing (no page in place of a script), and nothing is written.
    assert client.get("/missing.bundle.js").status_code == 404
    assert client.post("/").status_code == 405


def test_dicomweb_paths_are_never_the_viewer_page(client: TestClient) -> None:
    response = client.get(f"{DICOMWEB_ROOT}/no-such-resource")
    assert response.status_code == 404 and "OHIF" not in response.text


def test_app_config_is_generated_not_the_shipped_one(client: TestClient) -> None:
    response = client.get("/app-config.js")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == app_config() and "OHIF's demo server" not in response.text


@pytest.mark.tools("node")
def test_app_config_evaluates_to_one_dicomweb_source_on_the_pages_origin() -> None:
    """node runs the generated file as the browser would (window, location) and prints the
    configuration OHIF reads."""
    script = ("const window = {location: {origin: 'http://10.0.0.7:8080'}};\n" + app_config()
              + "\nprocess.stdout.write(JSON.stringify(window.config));")
    config = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True,
                                       timeout=30).stdout)
    (source,) = config["dataSources"]
    assert source["namespace"] == DICOMWEB_DATA_SOURCE and config["defaultDataSourceName"] == source["sourceName"]
    settings = source["configuration"]
    root = "http://10.0.0.7:8080" + DICOMWEB_ROOT
    assert (settings["qidoRoot"], settings["wadoRoot"], settings["wadoUriRoot"]) == (root, root, root)
    assert settings["imageRendering"] == settings["thumbnailRendering"] == "wadors"
    assert settings["enableStudyLazyLoad"] and settings["omitQuotationForMultipartRequest"]
    assert settings["bulkDataURI"] == {"enabled": True} and settings["supportsFuzzyMatching"] is False
    assert config["showStudyList"] and config["routerBasename"] is None

"""Every way into the spool assigns the research project, and the ingest writes it: dcmtk's
storescu to the real receiver under two called AE titles (KP-LUNG, KP-LIVER) and an unknown
one, a user's per-project spool folder through `kaapana ingest`, and dicomweb-client's STOW-RS
to a project path of the real service."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from bench.dicomweb_server import DicomwebServer
from kaapana_assets.archive.service import Archive
from kaapana_assets.cli import main
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.ingest.spool import scan_spool
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, SERIES_PROJECTS
from kaapana_assets.projects.assignment import ProjectSource
from kaapana_assets.projects.catalog import create_project
from kaapana_assets.projects.membership import DEFAULT_PROJECT
from kaapana_assets.synthetic import GeneratedStudy
from tests.helpers import Receiver, needs_dcmtk, storescu


@pytest.fixture
def project_home(tmp_path: Path) -> KaapanaHome:
    """A home with the projects lung and liver."""
    home = KaapanaHome(tmp_path / "home").ensure()
    create_project(Lake(home.lake), "lung", "Lung nodules")
    create_project(Lake(home.lake), "liver", "Liver tumours")
    return home


def _assigned(home: KaapanaHome) -> dict[str, tuple[str, str]]:
    """series → (project, assigned_by), for series in exactly one project."""
    rows = Lake(home.lake).read(SERIES_PROJECTS)
    assert rows["series_uid"].is_unique().all()
    return {r["series_uid"]: (r["project"], r["assigned_by"]) for r in rows.iter_rows(named=True)}


def _ingest_spool(home: KaapanaHome) -> None:
    """What the incoming sensor's run does with the spool (the same ProjectSource as the asset)."""
    files = [f.path for f in scan_spool(home.incoming)]
    report = ingest_files(files, Archive.for_home(home), workers=1, projects=ProjectSource(spool=home.incoming))
    assert report.summary()["indexed"] == len(files)


@needs_dcmtk
def test_called_ae_titles_land_series_in_their_projects(project_home: KaapanaHome,
                                                        corpus: dict[str, list[GeneratedStudy]]) -> None:
    lung, liver, stray = corpus["site-a"][0], corpus["site-b"][0], corpus["site-a"][1]
    receiver = Receiver(project_home.root)
    try:
        for study, called in ((lung, "KP-LUNG"), (liver, "KP-LIVER"), (stray, "KP-NOSUCH")):
            sent = storescu(receiver.port, study.ct_files, called=called)
            assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        receiver.stop()
    folders = {Path(f.path).relative_to(project_home.incoming).parts[:3] for f in scan_spool(project_home.incoming)}
    assert folders == {("projects", "lung", "STORESCU"), ("projects", "liver", "STORESCU"),
                       ("projects", "nosuch", "STORESCU")}
    _ingest_spool(project_home)
    assert _assigned(project_home) == {
        lung.series_uid: ("lung", "called-ae"),
        liver.series_uid: ("liver", "called-ae"),
        stray.series_uid: (DEFAULT_PROJECT, "default"),  # KP-<no project>: stored, then the default project
    }
    # The called AE title as the peer called it, in the file meta and the index (not our own title).
    called = Lake(project_home.lake).read(INSTANCES).group_by("series_uid").agg(pl.col("called_ae_title").unique())
    assert {r["series_uid"]: r["called_ae_title"] for r in called.iter_rows(named=True)} == {
        lung.series_uid: ["KP-LUNG"], liver.series_uid: ["KP-LIVER"], stray.series_uid: ["KP-NOSUCH"]}


def test_a_per_project_spool_folder_assigns_its_project(project_home: KaapanaHome,
                                                        corpus: dict[str, list[GeneratedStudy]],
                                                        capsys: pytest.CaptureFixture) -> None:
    dropped, plain = corpus["site-b"][1], corpus["site-b"][2]
    shutil.copytree(dropped.ct_files[0].parent, project_home.incoming / "projects" / "liver" / "mine" / "ct")
    shutil.copytree(plain.ct_files[0].parent, project_home.incoming / "from-a-cd")
    assert main(["ingest", str(project_home.incoming), "--home", str(project_home.root), "--workers", "1"]) == 0
    assert _assigned(project_home) == {dropped.series_uid: ("liver", "spool-folder"),
                                       plain.series_uid: (DEFAULT_PROJECT, "default")}
    assert main(["ingest", str(project_home.incoming), "--home", str(project_home.root), "--project", "nosuch"]) == 2
    assert "no project 'nosuch'" in capsys.readouterr().out


def test_stow_rs_to_a_project_path(project_home: KaapanaHome, corpus: dict[str, list[GeneratedStudy]]) -> None:
    study = corpus["site-a"][2]
    server = DicomwebServer(project_home.root, ("--stow",))
    try:
        answer = DICOMwebClient(f"{server.url}/projects/lung").store_instances(
            [pydicom.dcmread(f) for f in study.ct_files])
        assert len(answer.ReferencedSOPSequence) == len(study.ct_files) and "FailedSOPSequence" not in answer
        body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + study.ct_files[0].read_bytes() + b"\r\n--B--\r\n"
        headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}
        unknown = requests.post(f"{server.url}/projects/kidney/studies", data=body, headers=headers, timeout=30)
        assert unknown.status_code == 404 and "no project 'kidney'" in unknown.text
        malformed = requests.post(f"{server.url}/projects/Not_A_Name/studies", data=body, headers=headers, timeout=30)
        assert malformed.status_code == 400
    finally:
        server.stop()
    spooled = [Path(f.path).relative_to(project_home.incoming) for f in scan_spool(project_home.incoming)]
    assert len(spooled) == len(study.ct_files)  # the refused requests stored nothing
    assert {p.parts[:3] for p in spooled} == {("projects", "lung", "STOW-RS")}
    _ingest_spool(project_home)
    assert _assigned(project_home) == {study.series_uid: ("lung", "stow-path")}
    assert Lake(project_home.lake).read(SERIES_PROJECTS, pl.col("project") == "liver").height == 0

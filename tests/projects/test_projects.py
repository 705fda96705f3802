"""Research projects: the catalog, the routing of arrivals by called AE title and spool folder,
and the explicit, logged moves of series (`kaapana project ...` as a user runs it), on a real
lake whose series rows are written as the ingest writes them."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from kaapana_assets.cli import main
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import PROJECT_CHANGES, SERIES, SERIES_PROJECTS
from kaapana_assets.projects.assignment import (
    Arrived,
    AssignedBy,
    ChangeRefused,
    ProjectSource,
    add_series,
    assign_ingested,
    remove_series,
)
from kaapana_assets.projects.catalog import ProjectExists, UnknownProject, create_project, list_projects
from kaapana_assets.projects.membership import DEFAULT_PROJECT, ProjectNameError, scope_of
from kaapana_assets.projects.routing import AeTitleRouting, project_of_path, project_spool
from tests.helpers import merge_rows

SERIES_A, SERIES_B = "1.2.826.0.1.1", "1.2.826.0.1.2"


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    """Projects lung and liver; two indexed series, both in lung."""
    lake = Lake(tmp_path / "home" / "lake")
    create_project(lake, "lung", "Lung nodules")
    create_project(lake, "liver", "Liver tumours")
    merge_rows(lake, SERIES, [{"series_uid": s, "study_uid": "1.2.826.0.1", "modality": "CT"}
                              for s in (SERIES_A, SERIES_B)])
    assign_ingested(lake, [Arrived(s, "1.2.826.0.1", "lung", AssignedBy.CALLED_AE) for s in (SERIES_A, SERIES_B)])
    return lake


def _projects(lake: Lake, series_uid: str, version: int | None = None) -> set[str]:
    return set(lake.read(SERIES_PROJECTS, pl.col("series_uid") == series_uid, version=version)["project"].to_list())


def test_called_ae_titles_and_spool_folders_name_projects(tmp_path: Path) -> None:
    routing = AeTitleRouting.parse({"CT_SCANNER_7": "Lung"})
    assert routing.project_of("KP-LIVER") == "liver" and routing.project_of("kp-liver ") == "liver"
    assert routing.project_of("ct_scanner_7") == "lung"  # the explicit mapping, case-insensitive
    assert routing.project_of("KAAPANA") is None and routing.project_of("KP-") is None
    assert routing.project_of("KP-BAD_NAME") is None  # no project name: the plain spool (default project)
    with pytest.raises(ValueError, match="mapping 'X': project name 'no way!'"):
        AeTitleRouting.parse({"X": "no way!"})
    spool = tmp_path / "incoming"
    assert project_spool(spool, "Lung") == spool / "projects" / "lung"
    assert project_of_path(spool, spool / "projects" / "lung" / "KP-LUNG" / "a.dcm") == "lung"
    assert project_of_path(spool, spool / "STORESCU" / "a.dcm") is None
    assert project_of_path(spool, spool / "projects" / "a.dcm") is None  # a file, not a project folder
    assert project_of_path(spool, tmp_path / "elsewhere" / "projects" / "lung" / "a.dcm") is None


def test_projects_are_created_and_listed_with_the_default_always_there(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    lake = Lake(tmp_path / "home" / "lake")
    assert [p.project for p in list_projects(lake)] == [DEFAULT_PROJECT]  # before anything was written
    home = str(tmp_path / "home")
    assert main(["project", "create", "lung", "--title", "Lung nodules", "--home", home]) == 0
    assert "KP-LUNG" in capsys.readouterr().out
    assert [(p.project, p.title) for p in list_projects(lake)][1:] == [("lung", "Lung nodules")]
    assert list_projects(lake)[0].created_at is not None  # written with the first project
    assert main(["project", "create", "lung", "--title", "again", "--home", home]) == 2
    assert "exists already" in capsys.readouterr().out
    assert main(["project", "create", "Lung Nodules", "--title", "x", "--home", home]) == 2
    assert "lower-case letters" in capsys.readouterr().out
    with pytest.raises(ProjectExists):
        create_project(lake, DEFAULT_PROJECT, "the default")
    with pytest.raises(ProjectNameError):
        create_project(lake, "much-too-long-name", "x")
    assert main(["project", "list", "--home", home]) == 0
    listed = capsys.readouterr().out
    assert "lung" in listed and DEFAULT_PROJECT in listed


def test_ingest_assignments_follow_the_rules(lake: Lake, caplog: pytest.LogCaptureFixture) -> None:
    study, c, d, e = "1.2.826.0.2", "1.2.826.0.2.3", "1.2.826.0.2.4", "1.2.826.0.2.5"
    source = ProjectSource(spool=Path("/spool"))
    assert source.arrived("/spool/projects/lung/STOW-RS/x.dcm", c, study, "STOW-RS", "DICOMWEB").assigned_by \
        is AssignedBy.STOW_PATH
    assert source.arrived("/spool/projects/lung/CT1/x.dcm", c, study, "CT1", "KP-LUNG").assigned_by \
        is AssignedBy.CALLED_AE
    assert source.arrived("/spool/projects/lung/mine/x.dcm", c, study).assigned_by is AssignedBy.SPOOL_FOLDER
    assert source.arrived("/spool/CT1/x.dcm", c, study) == Arrived(c, study, None, AssignedBy.DEFAULT)
    written = assign_ingested(lake, [
        Arrived(c, study, "liver", AssignedBy.SPOOL_FOLDER), Arrived(c, study, None, AssignedBy.DEFAULT),
        Arrived(d, study, None, AssignedBy.DEFAULT),
        Arrived(e, study, "nosuch", AssignedBy.CALLED_AE),
    ])
    assert written is not None and written.inserted == 3
    assert _projects(lake, c) == {"liver"}  # named: no default beside it
    assert _projects(lake, d) == {DEFAULT_PROJECT}
    assert _projects(lake, e) == {DEFAULT_PROJECT}  # an unknown project: the default one, with a warning
    assert "project 'nosuch', which does not exist" in caplog.text
    # An unknown project for a series that has one already: no default beside it.
    assert assign_ingested(lake, [Arrived(c, study, "nosuch", AssignedBy.CALLED_AE)]) is None
    # Sent again without a project: it keeps its project; again with one: shared. Re-runs commit nothing.
    assert assign_ingested(lake, [Arrived(SERIES_A, "1.2.826.0.1", None, AssignedBy.DEFAULT)]) is None
    assign_ingested(lake, [Arrived(SERIES_A, "1.2.826.0.1", "liver", AssignedBy.CALLED_AE)])
    assert _projects(lake, SERIES_A) == {"lung", "liver"}
    assert assign_ingested(lake, [Arrived(SERIES_A, "1.2.826.0.1", "liver", AssignedBy.CALLED_AE)]) is None


def test_moves_are_logged_and_time_travel(lake: Lake, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = str(tmp_path / "home")
    before = lake.version(SERIES_PROJECTS)
    assert main(["project", "add-series", "liver", SERIES_A, "--reason", "shared for the liver study",
                 "--operator", "dr.who", "--home", home]) == 0
    assert main(["project", "remove-series", "lung", SERIES_A, "--reason", "wrong project", "--operator",
                 "dr.who", "--home", home]) == 0
    assert "1 series removed from 'lung' by dr.who" in capsys.readouterr().out
    assert _projects(lake, SERIES_A) == {"liver"}
    assert _projects(lake, SERIES_A, version=before) == {"lung"}  # time travel: the membership as it was
    assert SERIES_A in scope_of(lake, ["lung"], before).series_uids
    assert SERIES_A not in scope_of(lake, ["lung"]).series_uids
    assert lake.read(SERIES).height == 2  # a move never deletes the series
    log = lake.read(PROJECT_CHANGES).sort("changed_at")
    assert log.select("series_uid", "project", "action", "operator", "reason").rows() == [
        (SERIES_A, "liver", "add", "dr.who", "shared for the liver study"),
        (SERIES_A, "lung", "remove", "dr.who", "wrong project"),
    ]
    # Its last project removed: the series goes to the default project, logged as well.
    change = remove_series(lake, "lung", [SERIES_B], operator="dr.who", reason="not a lung case")
    assert change.moved_to_default == (SERIES_B,) and _projects(lake, SERIES_B) == {DEFAULT_PROJECT}
    assert lake.read(PROJECT_CHANGES, pl.col("series_uid") == SERIES_B).select("project", "action").sort(
        "project").rows() == [(DEFAULT_PROJECT, "add"), ("lung", "remove")]
    assert main(["project", "history", "--series-uid", SERIES_B, "--home", home]) == 0
    assert f"remove {SERIES_B} from lung by dr.who: not a lung case" in capsys.readouterr().out


def test_bad_moves_are_refused_and_change_nothing(lake: Lake, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    version = lake.version(SERIES_PROJECTS)
    with pytest.raises(ChangeRefused, match="needs a --reason"):
        add_series(lake, "liver", [SERIES_A], operator="dr.who", reason=" ")
    with pytest.raises(ChangeRefused, match="who makes this change"):
        add_series(lake, "liver", [SERIES_A], operator="", reason="r")
    with pytest.raises(UnknownProject, match="no project 'kidney'; known: admin, liver, lung"):
        add_series(lake, "kidney", [SERIES_A], operator="dr.who", reason="r")
    with pytest.raises(ChangeRefused, match="not indexed .*1.2.826.0.9"):
        add_series(lake, "liver", [SERIES_A, "1.2.826.0.9"], operator="dr.who", reason="r")
    with pytest.raises(ChangeRefused, match="not SeriesInstanceUIDs: 1' OR '1"):
        remove_series(lake, "lung", ["1' OR '1"], operator="dr.who", reason="r")
    remove_series(lake, "lung", [SERIES_B], operator="dr.who", reason="r")  # now only in the default project
    with pytest.raises(ChangeRefused, match="the default project is their only project"):
        remove_series(lake, DEFAULT_PROJECT, [SERIES_B], operator="dr.who", reason="r")
    assert main(["project", "add-series", "kidney", SERIES_A, "--reason", "r", "--operator", "dr.who", "--home",
                 str(tmp_path / "home")]) == 2
    assert "no project 'kidney'" in capsys.readouterr().out
    assert lake.version(SERIES_PROJECTS) == version + 2  # the one accepted change: its default row, its removal
    assert lake.read(PROJECT_CHANGES).height == 2


def test_series_indexed_before_projects_are_given_one(lake: Lake, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    older = "1.2.826.0.1.7"
    merge_rows(lake, SERIES, [{"series_uid": older, "study_uid": "1.2.826.0.1", "modality": "CT"}])
    assert older not in scope_of(lake, [DEFAULT_PROJECT]).series_uids
    args = ["project", "add-series", DEFAULT_PROJECT, "--unassigned", "--reason", "indexed before projects",
            "--operator", "dr.who", "--home", str(tmp_path / "home")]
    assert main(args) == 0
    assert "1 series added to 'admin'" in capsys.readouterr().out
    assert scope_of(lake, [DEFAULT_PROJECT]).series_uids == {older}
    assert main(args) == 0 and "no series given (and none is unassigned)" in capsys.readouterr().out

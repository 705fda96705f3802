"""A cohort belongs to one research project and selects only that project's series, at a pinned
`series_projects` version: series of another project never enter it, not even when they match
its filter or its include_series names them; a version cut before a move keeps reading the
membership it was cut with."""

from __future__ import annotations

import shutil

import pytest

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.definitions import CohortDefinition, CohortDefinitionError, parse_definition
from kaapana_assets.cohorts.membership import EmptyCohort, read_cohort, snapshot_cohort
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.ingest.spool import scan_spool
from kaapana_assets.lake import Lake
from kaapana_assets.projects.assignment import ProjectSource, add_series, remove_series
from kaapana_assets.projects.catalog import create_project
from kaapana_assets.projects.membership import DEFAULT_PROJECT, scope_of
from kaapana_assets.synthetic import GeneratedStudy


def test_a_cohort_of_one_project_never_holds_a_series_of_another(
        home: KaapanaHome, corpus: dict[str, list[GeneratedStudy]]) -> None:
    lake = Lake(home.lake)
    create_project(lake, "lung", "Lung nodules")
    create_project(lake, "liver", "Liver tumours")
    # Both sites' CT series match the same filter: site-a's arrive for lung, site-b's for liver.
    for site, project in (("site-a", "lung"), ("site-b", "liver")):
        for study in corpus[site]:
            shutil.copytree(study.ct_files[0].parent, home.incoming / "projects" / project / site / study.study_uid)
    ingest_files([f.path for f in scan_spool(home.incoming)], Archive.for_home(home), workers=1,
                 projects=ProjectSource(spool=home.incoming))
    lung = {s.series_uid for s in corpus["site-a"]}
    liver = {s.series_uid for s in corpus["site-b"]}
    intruder = sorted(liver)[0]
    definition = CohortDefinition.model_validate({
        "name": "lung-ct", "purpose": "inference", "project": "lung",
        "filter": {"modality": "CT", "include_series": [intruder]}})
    v1 = snapshot_cohort(lake, definition)
    assert set(v1.members["series_uid"].to_list()) == lung and v1.project == "lung"
    pinned = v1.series_projects_table_version
    assert pinned is not None and scope_of(lake, ["lung"], pinned).series_uids == lung

    # A default-project cohort with the same filter sees neither project's series.
    with pytest.raises(EmptyCohort, match="no series of project 'admin'"):
        snapshot_cohort(lake, definition.model_copy(update={"name": "all-ct", "project": DEFAULT_PROJECT}))

    # Moved: one lung series into liver, the intruder shared into lung as well.
    moved = sorted(lung)[0]
    add_series(lake, "liver", [moved], operator="dr.who", reason="a liver case")
    remove_series(lake, "lung", [moved], operator="dr.who", reason="a liver case")
    add_series(lake, "lung", [intruder], operator="dr.who", reason="shared")
    v2 = snapshot_cohort(lake, definition)
    assert v2.version == 2 and set(v2.members["series_uid"].to_list()) == lung - {moved} | {intruder}
    # Version 1, read after the move, holds what it was cut with; its pinned scope says why.
    again = read_cohort(lake, "lung-ct", 1)
    assert set(again.members["series_uid"].to_list()) == lung
    assert again.series_projects_table_version == pinned
    assert moved in scope_of(lake, ["lung"], pinned).series_uids and moved not in scope_of(lake, ["lung"]).series_uids


def test_a_cohort_project_is_a_project_name() -> None:
    text = "name: c\npurpose: test\nproject: Lung Nodules\n"
    with pytest.raises(CohortDefinitionError, match="c.yaml: project: .*lower-case letters"):
        parse_definition(text, "cohorts/c.yaml")
    assert parse_definition("name: c\npurpose: test\nproject: LUNG\n").project == "lung"
    # The default project's definitions hash as they did before cohorts had projects.
    plain = parse_definition("name: c\npurpose: test\n")
    assert plain.digest() == parse_definition(f"name: c\npurpose: test\nproject: {DEFAULT_PROJECT}\n").digest()
    assert plain.digest() != parse_definition("name: c\npurpose: test\nproject: lung\n").digest()

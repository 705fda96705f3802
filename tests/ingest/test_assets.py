"""The ingest assets materialized on a real Dagster instance."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from kaapana_assets.dicomweb.links import SegView, viewer_url
from kaapana_assets.ingest.assets import dicom_studies, quarantine
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE, SERIES_PROJECTS
from kaapana_assets.projects.catalog import create_project
from resources.storage import ArchiveResource, LakeResource
from resources.viewer import ViewerResource
from tests.helpers import ViewerLink, viewer_link

VIEWER = "http://viewer.example.org:8080"


def _resources(home: Path) -> dict:
    return {"lake": LakeResource(uri=str(home / "lake")), "archive": ArchiveResource(home=str(home), ingest_workers=1),
            "viewer": ViewerResource(url=VIEWER)}


def _materialization(result: dg.ExecuteInProcessResult) -> dg.AssetMaterialization:
    events = result.asset_materializations_for_node("dicom_studies")
    assert len(events) == 1
    return events[0]


def test_dicom_studies_materializes_with_versions_and_preview(tmp_path: Path, corpus: dict) -> None:
    home = tmp_path / "home"
    study = corpus["site-a"][0]
    create_project(Lake(home / "lake"), "lung", "Lung nodules")
    spool = home / "incoming" / "projects" / "lung" / "s1"  # a user's drop into the lung project's folder
    spool.mkdir(parents=True)
    for f in study.files:
        shutil.copy(f, spool / f"{f.parent.name}-{f.name}")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("studies", [study.study_uid])
        # No file list: the asset finds the study's files in the spool (UI-launched run).
        result = dg.materialize([dicom_studies], partition_key=study.study_uid, instance=instance, resources=_resources(home))
        assert result.success
        m = _materialization(result)
        md = m.metadata
        assert md["instances"].value == len(study.files)
        assert md["new_instances"].value == len(study.files)
        assert md["quarantined"].value == 0
        assert md["modalities"].value == "CT, SEG"
        # The link that opens the study in the viewer, parsed back: OHIF's route and the study's UID.
        assert isinstance(md["viewer"], dg.UrlMetadataValue)
        assert viewer_link(md["viewer"].value) == ViewerLink(VIEWER, "/viewer", {"StudyInstanceUIDs": [study.study_uid]})
        # Its reference SEG, over the CT it segments.
        assert re.findall(r"\]\(([^)]+)\)", md["segs_in_viewer"].value) == [
            viewer_url(VIEWER, study.study_uid, SegView(study.seg_series_uid, study.series_uid))]
        versions = md["delta_versions"].value
        lake = Lake(home / "lake")
        assert versions["instances"] == lake.version(INSTANCES) is not None
        assert versions["series_projects"] == lake.version(SERIES_PROJECTS) is not None
        assert sorted(lake.read(SERIES_PROJECTS).select("series_uid", "project", "assigned_by").rows()) == sorted(
            [(study.series_uid, "lung", "spool-folder"), (study.seg_series_uid, "lung", "spool-folder")])
        series = md["series"]
        assert isinstance(series, dg.TableMetadataValue)
        by_modality = {r.data["modality"]: r.data for r in series.records}
        assert by_modality["CT"]["instances"] == len(study.ct_files) and by_modality["CT"]["complete"] is True
        assert by_modality["CT"]["reference_segs"] == 1 and by_modality["SEG"]["instances"] == 1
        assert md["preview"].value.startswith("![middle slice")
        assert "data:image/png;base64," in md["preview"].value
        first_version = m.tags["dagster/data_version"]
        assert not list(spool.iterdir())  # the spool is emptied once committed

        # Re-materializing with nothing new keeps the data version.
        again = dg.materialize([dicom_studies], partition_key=study.study_uid, instance=instance, resources=_resources(home))
        m2 = _materialization(again)
        assert m2.tags["dagster/data_version"] == first_version
        assert m2.metadata["new_instances"].value == 0
        assert lake.read(INSTANCES, pl.col("study_uid") == study.study_uid).height == len(study.files)


def test_study_that_cannot_be_indexed_fails_clearly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "incoming").mkdir(parents=True)
    bad = home / "incoming" / "bad.dcm"
    bad.write_bytes(b"nope")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("studies", ["1.2.3"])
        result = dg.materialize(
            [dicom_studies], partition_key="1.2.3", instance=instance, resources=_resources(home),
            run_config={"ops": {"dicom_studies": {"config": {"files": [str(bad)]}}}}, raise_on_error=False,
        )
        assert not result.success
        failure = result.failure_data_for_node("dicom_studies")
        assert "No instance of study 1.2.3 is indexed" in failure.error.message  # type: ignore[union-attr]
        assert Lake(home / "lake").read(QUARANTINE).height == 1  # and the file was kept


def test_quarantine_asset(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "incoming").mkdir(parents=True)
    bad = home / "incoming" / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [quarantine], instance=instance, resources=_resources(home),
            run_config={"ops": {"quarantine": {"config": {"files": [str(bad)]}}}},
        )
        md = result.asset_materializations_for_node("quarantine")[0].metadata
        assert md["quarantined"].value == 1 and md["quarantine_total"].value == 1
        assert not bad.exists()

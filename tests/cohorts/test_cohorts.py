"""Cohorts: definitions, every filter field, versions and time travel, tags, checks, statistics."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pydicom
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.definitions import (
    EXAMPLES,
    CohortDefinition,
    CohortDefinitionError,
    load_definitions,
    parse_definition,
)
from kaapana_assets.cohorts.harmonization import CHECKS
from kaapana_assets.cohorts.membership import EmptyCohort, read_cohort, snapshot_cohort
from kaapana_assets.cohorts.statistics import compute_statistics, openmetrics_text
from kaapana_assets.cohorts.tags import add_tag, remove_tag, tags_of
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import SERIES, SITE_STATISTICS, TAGS
from kaapana_assets.projects.assignment import add_series
from kaapana_assets.projects.catalog import create_project
from tests.helpers import dicom_files


def define(**fields: Any) -> CohortDefinition:
    base: dict[str, Any] = {"name": "c", "purpose": "inference", "filter": {}}
    base.update(fields)
    return CohortDefinition.model_validate(base)


def derive_series(files: list[Path], out: Path, tag: str, drop: int | None = None, **changes: Any) -> list[Path]:
    """A copy of a series as a new study/series (fresh UIDs), with attributes changed."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if ds.Modality == "SEG" or (drop is not None and ds.InstanceNumber == drop):
            continue
        ds.StudyInstanceUID = f"1.2.826.0.1.99.{tag}.1"
        ds.SeriesInstanceUID = f"1.2.826.0.1.99.{tag}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.99.{tag}.3.{i + 1}"
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


ODD = {"sagittal": "11", "gappy": "12", "mr": "13"}


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, corpus: dict) -> Lake:
    """The corpus (two sites × three annotated studies) plus three odd series."""
    root = tmp_path_factory.mktemp("cohorts")
    spool = root / "spool"
    shutil.copytree(corpus["site-a"][0].ct_files[0].parents[3], spool)
    source = corpus["site-a"][0].ct_files
    derive_series(source, spool / "odd" / "sag", ODD["sagittal"], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    derive_series(source, spool / "odd" / "gap", ODD["gappy"], drop=5)
    derive_series(source, spool / "odd" / "mr", ODD["mr"], Modality="MR")
    ingest_files(dicom_files(spool), Archive.for_home(KaapanaHome(root / "home")))
    return Lake(root / "home" / "lake")


def odd(name: str) -> str:
    return f"1.2.826.0.1.99.{ODD[name]}.2"


def members(lake: Lake, **fields: Any) -> set[str]:
    series = lake.read(SERIES)
    from kaapana_assets.cohorts.membership import select_series

    return set(select_series(series, lake.read(TAGS), define(**fields))["series_uid"].to_list())


def ct_of(corpus: dict, site: str) -> set[str]:
    return {s.series_uid for s in corpus[site]}


# -- definitions -------------------------------------------------------------------


def test_shipped_examples_are_valid() -> None:
    found, errors = load_definitions(EXAMPLES)
    assert errors == [] and {"liver-train", "abdomen-ct-all", "reviewed-test"} <= set(found)


@pytest.mark.parametrize(
    "text,field",
    [
        ("name: c\npurpose: train\nfilter: {modalty: CT}", "filter.modalty"),
        ("name: c\npurpose: training", "purpose"),
        ("name: c\npurpose: test\nfilter: {series_description: '(unclosed'}", "filter.series_description"),
        ("name: c\npurpose: test\nfilter: {include_series: ['../../etc']}", "filter.include_series"),
        ("name: c\npurpose: test\nfilter: {slice_thickness: {min: 5, max: 1}}", "filter.slice_thickness"),
        ("name: c\npurpose: test\nfilter: {tags: ['bad tag']}", "filter.tags"),
        ("name: C D\npurpose: test", "name"),
        ("purpose: test", "name"),
        ("name: c\npurpose: [test", "(yaml)"),
        ("- just a list", "(document)"),
    ],
)
def test_bad_definitions_name_file_and_field(text: str, field: str) -> None:
    with pytest.raises(CohortDefinitionError) as exc:
        parse_definition(text, "cohorts/c.yaml")
    assert exc.value.field == field and str(exc.value).startswith("cohorts/c.yaml: ")


def test_definition_file_name_must_match(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text("name: c\npurpose: test\n")
    (tmp_path / "good.yaml").write_text("name: good\npurpose: test\n")
    found, errors = load_definitions(tmp_path)
    assert list(found) == ["good"] and errors[0].field == "name" and "other.yaml" in str(errors[0])


# -- every filter field ------------------------------------------------------------


def test_filter_fields(lake: Lake, corpus: dict) -> None:
    site_a, site_b = ct_of(corpus, "site-a"), ct_of(corpus, "site-b")
    odd_ct = {odd("sagittal"), odd("gappy")}
    everything_ct = site_a | site_b | odd_ct
    assert members(lake, filter={"modality": "CT"}) == everything_ct
    assert members(lake, filter={"modality": ["MR"]}) == {odd("mr")}
    assert members(lake, filter={"body_part": "abdomen"}) == everything_ct | {odd("mr")}
    assert members(lake, filter={"manufacturer": "GE MEDICAL SYSTEMS"}) == site_b
    assert members(lake, filter={"institution": ["Essen University Hospital (synthetic)"]}) == site_b
    thickness_a = lake.read(SERIES, pl.col("series_uid").is_in(list(site_a)))["slice_thickness"][0]
    assert members(lake, filter={"slice_thickness": {"min": thickness_a - 0.1, "max": thickness_a + 0.1}}) == site_a | odd_ct | {odd("mr")}
    assert members(lake, filter={"series_description": "(?i)portal"}) == site_b
    first_date = {corpus["site-a"][0].series_uid, corpus["site-b"][0].series_uid}
    assert members(lake, filter={"modality": "CT", "study_date": {"from": "2024-01-08", "to": "2024-01-08"}}) >= first_date
    assert not members(lake, filter={"study_date": {"from": "2030-01-01"}})
    assert members(lake, filter={"has_reference_segmentation": True}) == site_a | site_b
    assert members(lake, filter={"modality": "CT", "has_reference_segmentation": False}) == odd_ct
    one = sorted(site_a)[0]
    assert members(lake, filter={"modality": "MR", "include_series": [one]}) == {odd("mr"), one}
    assert members(lake, filter={"modality": "CT", "exclude_series": [one]}) == everything_ct - {one}


def test_tags_filter_and_commands(lake: Lake, corpus: dict) -> None:
    chosen = sorted(ct_of(corpus, "site-b"))[:2]
    add_tag(lake, "reviewed", chosen)
    add_tag(lake, "teaching", chosen[:1])
    try:
        assert members(lake, filter={"tags": "reviewed"}) == set(chosen)
        assert members(lake, filter={"tags": ["reviewed", "teaching"]}) == {chosen[0]}
        assert tags_of(lake, chosen[0]) == ["reviewed", "teaching"]
        assert add_tag(lake, "reviewed", chosen).inserted == 0  # idempotent
        with pytest.raises(KeyError, match="not in the index"):
            add_tag(lake, "reviewed", ["1.2.3.4.5"])
        with pytest.raises(ValueError, match="tag"):
            add_tag(lake, "x' OR '1'='1", chosen)
    finally:
        remove_tag(lake, "reviewed", chosen)
        remove_tag(lake, "teaching", chosen)
    assert members(lake, filter={"tags": "reviewed"}) == set()


# -- versions and time travel -------------------------------------------------------


def test_versions_and_time_travel(tmp_path: Path, corpus: dict) -> None:
    home = KaapanaHome(tmp_path / "home")
    targets = Archive.for_home(home)
    study = corpus["site-a"][0]
    ingest_files(study.ct_files[:-1] + [study.seg_file], targets, remove_sources=False)  # one slice still missing
    definition = define(name="v", filter={"modality": "CT"})
    v1 = snapshot_cohort(targets.lake, definition)
    assert (v1.version, v1.created, v1.size) == (1, True, 1)
    assert v1.members["instance_count"][0] == len(study.ct_files) - 1
    again = snapshot_cohort(targets.lake, definition)
    assert (again.version, again.created, again.membership_hash) == (1, False, v1.membership_hash)

    ingest_files(study.ct_files[-1:], targets, remove_sources=False)  # the late slice arrives
    v2 = snapshot_cohort(targets.lake, definition)
    assert (v2.version, v2.created) == (2, True) and v2.membership_hash != v1.membership_hash
    assert v2.members["instance_count"][0] == len(study.ct_files)
    old = read_cohort(targets.lake, "v", 1)  # exactly as it was, by time travel
    assert old.members["instance_count"][0] == len(study.ct_files) - 1
    assert old.members.drop("cohort_version").equals(v1.members.drop("cohort_version"))
    with pytest.raises(EmptyCohort, match="matches no series"):
        snapshot_cohort(targets.lake, define(name="none", filter={"modality": "PT"}))

    from kaapana_assets.cli import main

    assert main(["cohort", "show", "v", "--version", "1", "--home", str(home.root)]) == 0
    assert main(["cohort", "show", "v", "--version", "7", "--home", str(home.root)]) == 2
    assert main(["tag", "add", "gold", "--cohort", "v", "--home", str(home.root)]) == 0
    assert tags_of(targets.lake, study.series_uid) == ["gold"]


def test_a_model_written_seg_is_no_reference(tmp_path: Path, corpus: dict) -> None:
    """A study the automation segmented is not thereby annotated: a training cohort must not
    pick it up, nor train on the model's own prediction. Decided from the SEG's own attributes
    (cohorts/references.py), with no `segmentations` row needed."""
    from kaapana_assets.ingest.volume import assemble_volume, seg_labels
    from kaapana_assets.segmentation.dicom_seg import encode_seg, model_seg

    targets = Archive.for_home(KaapanaHome(tmp_path / "home"))
    annotated_study, segmented_only = corpus["site-a"][0], corpus["site-a"][1]
    files = [*annotated_study.files, *segmented_only.ct_files]
    for i, study in enumerate((annotated_study, segmented_only)):
        volume = assemble_volume(study.ct_files)
        labels = seg_labels(study.seg_file, volume, {"liver": 1, "lesion": 2})
        seg, _ = model_seg(volume, labels, {0: "background", 1: "liver", 2: "lesion"}, "m", "1")
        files.append(tmp_path / f"model{i}.dcm")
        files[-1].write_bytes(encode_seg(seg))
    ingest_files(files, targets, remove_sources=False)
    annotated = define(name="annotated", filter={"modality": "CT", "has_reference_segmentation": True})
    first = snapshot_cohort(targets.lake, annotated)
    assert first.members["series_uid"].to_list() == [annotated_study.series_uid]
    assert first.members["reference_seg_series_uids"].to_list() == [[annotated_study.seg_series_uid]]
    everything = snapshot_cohort(targets.lake, define(name="all", filter={"modality": "CT"}))
    bare = everything.members.filter(pl.col("series_uid") == segmented_only.series_uid)
    assert bare["reference_seg_series_uids"].to_list() == [[]] and bare["reference_labels"].to_list() == [[]]
    # The series table keeps the raw fact: both SEGs point at the annotated series.
    raw = targets.lake.read(SERIES, pl.col("series_uid") == annotated_study.series_uid)
    assert len(raw["reference_seg_series_uids"][0]) == 2


# -- harmonization checks ----------------------------------------------------------


def outcome(lake: Lake, check: str, name: str, **fields: Any):  # type: ignore[no-untyped-def]
    definition = define(name=name, **fields)
    snapshot_cohort(lake, definition)
    return CHECKS[check](read_cohort(lake, name), definition)


def members_of(lake: Lake, name: str) -> set[str]:
    return set(read_cohort(lake, name).members["series_uid"].to_list())


def offenders(result) -> set[str]:  # type: ignore[no-untyped-def]
    return {o["series_uid"] for o in result.offending}


def test_single_modality(lake: Lake) -> None:
    assert outcome(lake, "single_modality", "m1", filter={"modality": "CT"}).passed
    failed = outcome(lake, "single_modality", "m2", filter={"modality": ["CT", "MR"]})
    assert not failed.passed and offenders(failed) == {odd("mr")}


def test_spacing_spread(lake: Lake, corpus: dict) -> None:
    two_sites = {"filter": {"modality": "CT", "has_reference_segmentation": True}}
    tight = outcome(lake, "slice_thickness_spread", "s1", harmonization={"slice_thickness_tolerance_mm": 0.5}, **two_sites)
    assert not tight.passed and offenders(tight) and offenders(tight) <= ct_of(corpus, "site-a") | ct_of(corpus, "site-b")
    assert outcome(lake, "slice_thickness_spread", "s2", harmonization={"slice_thickness_tolerance_mm": 5}, **two_sites).passed
    one_site = {"filter": {"manufacturer": "SIEMENS", "has_reference_segmentation": True}}
    assert outcome(lake, "slice_thickness_spread", "s3", **one_site).passed
    assert outcome(lake, "pixel_spacing_spread", "p1", **one_site).passed
    spacing = outcome(lake, "pixel_spacing_spread", "p2", harmonization={"pixel_spacing_tolerance_mm": 0.01}, **two_sites)
    assert not spacing.passed and offenders(spacing)


def test_axial_orientation(lake: Lake) -> None:
    assert outcome(lake, "axial_orientation", "a1", filter={"has_reference_segmentation": True}).passed
    failed = outcome(lake, "axial_orientation", "a2", filter={"modality": "CT"})
    assert not failed.passed and offenders(failed) == {odd("sagittal")}


def test_series_complete(lake: Lake) -> None:
    assert outcome(lake, "series_complete", "c1", filter={"has_reference_segmentation": True}).passed
    failed = outcome(lake, "series_complete", "c2", filter={"modality": "CT"})
    assert not failed.passed and offenders(failed) == {odd("gappy")}
    assert "missing instances 5" in failed.offending[0]["problem"]


def test_reference_segmentations(lake: Lake, corpus: dict) -> None:
    annotated = {"filter": {"modality": "CT", "has_reference_segmentation": True}}
    assert outcome(lake, "reference_segmentations", "r1", purpose="train", required_labels=["liver"], **annotated).passed
    # A required label no accepted reference holds: not annotated for this cohort. Membership
    # leaves such series out; the check, on a cohort without that filter, names them.
    without = {s.series_uid for site in corpus.values() for s in site if "lesion" not in s.labels_present}
    assert outcome(lake, "reference_segmentations", "r2", purpose="train", required_labels=["lesion"], **annotated).passed
    assert members_of(lake, "r2") == (ct_of(corpus, "site-a") | ct_of(corpus, "site-b")) - without
    lesion = outcome(lake, "reference_segmentations", "r2b", purpose="train", required_labels=["lesion"],
                     filter={"modality": "CT", "exclude_series": [odd("sagittal"), odd("gappy")]})
    assert not lesion.passed and offenders(lesion) == without
    assert {o["problem"] for o in lesion.offending} == {"reference SEG lacks ['lesion']"}
    unannotated = outcome(lake, "reference_segmentations", "r3", purpose="train", required_labels=["liver"], filter={"modality": "CT"})
    assert offenders(unannotated) == {odd("sagittal"), odd("gappy")}
    assert all(o["problem"] == "no reference SEG" for o in unannotated.offending)
    assert outcome(lake, "reference_segmentations", "r4", purpose="test", filter={"modality": "CT"}).passed


def test_minimum_size(lake: Lake) -> None:
    assert outcome(lake, "minimum_size", "n1", filter={"modality": "CT"}, harmonization={"min_size": 2}).passed
    failed = outcome(lake, "minimum_size", "n2", filter={"modality": "CT"}, harmonization={"min_size": 100})
    assert not failed.passed and "minimum 100" in failed.description


# -- through Dagster: blocking checks ------------------------------------------------


def test_failed_check_blocks_downstream(tmp_path: Path, corpus_root: Path) -> None:
    from kaapana_assets.cohorts.assets import cohorts, harmonization_checks
    from resources import ArchiveResource, CohortDefinitionsResource, LakeResource

    home = tmp_path / "home"
    spool = tmp_path / "spool"
    shutil.copytree(corpus_root, spool)
    ingest_files(dicom_files(spool), Archive.for_home(KaapanaHome(home)))
    folder = tmp_path / "defs"
    folder.mkdir()
    (folder / "ok.yaml").write_text("name: ok\npurpose: train\nrequired_labels: [liver]\nfilter:\n  manufacturer: SIEMENS\n  has_reference_segmentation: true\n")
    (folder / "mixed.yaml").write_text("name: mixed\npurpose: train\nrequired_labels: [liver]\nfilter:\n  has_reference_segmentation: true\n")

    @dg.asset(partitions_def=cohorts.partitions_def, deps=[cohorts])
    def downstream_training() -> None:
        """Stands in for nnunet_dataset: it must not run on an unharmonized cohort."""

    resources = {
        "lake": LakeResource(uri=str(home / "lake")),
        "archive": ArchiveResource(home=str(home)),
        "cohort_definitions": CohortDefinitionsResource(folder=str(folder)),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cohorts", ["ok", "mixed"])
        good = dg.materialize([cohorts, *harmonization_checks, downstream_training], partition_key="ok",
                              instance=instance, resources=resources)
        assert good.success
        evaluations = good.get_asset_check_evaluations()
        assert len(evaluations) == len(CHECKS) and all(e.passed for e in evaluations)
        assert good.asset_materializations_for_node("downstream_training")

        bad = dg.materialize([cohorts, *harmonization_checks, downstream_training], partition_key="mixed",
                             instance=instance, resources=resources, raise_on_error=False)
        failed = {e.check_name: e for e in bad.get_asset_check_evaluations() if not e.passed}
        assert set(failed) == {"slice_thickness_spread"}
        offending = failed["slice_thickness_spread"].metadata["offending_series"]
        assert isinstance(offending, dg.TableMetadataValue)
        assert [c.name for c in offending.schema.columns] == ["series_uid", "study_uid", "site", "problem"]
        assert offending.records and all(r.data["series_uid"] and r.data["problem"] for r in offending.records)
        cohort_md = bad.asset_materializations_for_node("cohorts")[0].metadata
        sites = cohort_md["sites"]
        assert isinstance(sites, dg.TableMetadataValue) and len(sites.records) >= 2  # mixed: several scanners
        assert sum(int(r.data["series"] or 0) for r in sites.records) == cohort_md["series"].value
        assert not bad.asset_materializations_for_node("downstream_training")  # blocked


# -- statistics ----------------------------------------------------------------------


def test_statistics_match_the_corpus_and_parse_back(tmp_path: Path, corpus: dict, corpus_root: Path) -> None:
    home = KaapanaHome(tmp_path / "home")
    spool = tmp_path / "spool"
    shutil.copytree(corpus_root, spool)
    (spool / "junk.dcm").write_bytes(b"junk")
    targets = Archive.for_home(home)
    ingest_files(dicom_files(spool), targets)
    snapshot_cohort(targets.lake, define(name="all-ct", filter={"modality": "CT"}))
    studies = [s for site in corpus.values() for s in site]
    samples = {(s.metric, tuple(sorted(s.labels.items()))): s.value for s in compute_statistics(targets.lake)}
    assert samples[("kaapana_dicom_patients_total", ())] == len({(s.site, s.patient_id) for s in studies})
    assert samples[("kaapana_dicom_studies_total", ())] == len(studies)
    assert samples[("kaapana_dicom_series_total", (("modality", "CT"),))] == len(studies)
    assert samples[("kaapana_dicom_series_total", (("modality", "SEG"),))] == len(studies)
    assert samples[("kaapana_dicom_instances_total", (("modality", "CT"),))] == sum(len(s.ct_files) for s in studies)
    assert samples[("kaapana_dicom_instances_total", (("modality", "SEG"),))] == len(studies)
    assert samples[("kaapana_dicom_quarantined_total", (("reason", "not_dicom"),))] == 1
    assert samples[("kaapana_cohort_series", (("cohort", "all-ct"), ("project", "admin"), ("version", "1")))] \
        == len(studies)
    # Everything ingested without a project is the default project's ...
    assert samples[("kaapana_project_studies", (("project", "admin"),))] == len(studies)
    assert samples[("kaapana_project_instances", (("modality", "CT"), ("project", "admin")))] \
        == sum(len(s.ct_files) for s in studies)
    # ... until one study's CT is shared with project "liver": counted in both, its SEG only in admin.
    shared = studies[0]
    create_project(targets.lake, "liver", "Liver study")
    add_series(targets.lake, "liver", [shared.series_uid], operator="test", reason="shared for the liver study")
    samples = {(s.metric, tuple(sorted(s.labels.items()))): s.value for s in compute_statistics(targets.lake)}
    assert samples[("kaapana_project_patients", (("project", "liver"),))] == 1
    assert samples[("kaapana_project_studies", (("project", "liver"),))] == 1
    assert samples[("kaapana_project_series", (("modality", "CT"), ("project", "liver")))] == 1
    assert samples[("kaapana_project_instances", (("modality", "CT"), ("project", "liver")))] == len(shared.ct_files)
    assert ("kaapana_project_series", (("modality", "SEG"), ("project", "liver"))) not in samples
    assert samples[("kaapana_project_series", (("modality", "CT"), ("project", "admin")))] == len(studies)
    assert samples[("kaapana_dicom_series_total", (("modality", "CT"),))] == len(studies)

    text = openmetrics_text(compute_statistics(targets.lake), site="site-x")
    parsed = {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "site"))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert parsed == samples
    assert all(
        sample.labels["site"] == "site-x" for family in text_string_to_metric_families(text) for sample in family.samples
    )


def test_site_statistics_asset(tmp_path: Path, corpus_root: Path) -> None:
    from kaapana_assets.cohorts.assets import site_statistics
    from resources import ArchiveResource, LakeResource

    home = tmp_path / "home"
    spool = tmp_path / "spool"
    shutil.copytree(corpus_root, spool)
    ingest_files(dicom_files(spool), Archive.for_home(KaapanaHome(home)))
    with dg.instance_for_test() as instance:
        result = dg.materialize([site_statistics], instance=instance, resources={
            "lake": LakeResource(uri=str(home / "lake")), "archive": ArchiveResource(home=str(home), site="site-z")})
        md = result.asset_materializations_for_node("site_statistics")[0].metadata
        assert md["studies"].value == 6
        statistics = md["statistics"]
        assert isinstance(statistics, dg.TableMetadataValue)
        rows = {(r.data["metric"], r.data["labels"]): r.data["value"] for r in statistics.records}
        assert rows[("kaapana_dicom_studies_total", "")] == 6
        assert rows[("kaapana_dicom_series_total", "modality=CT")] == 6
        text = (home / "metrics" / "kaapana.prom").read_text()
        assert 'kaapana_dicom_studies_total{site="site-z"} 6.0' in text and text.rstrip().endswith("# EOF")
        assert Lake(home / "lake").read(SITE_STATISTICS).height > 0

"""The Python client on a real lake and archive: cohort versions with time travel, cases as
arrays equal to the phantoms' ground truth, NIfTI export with its manifest, SEGs read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from kaapana_assets.archive.service import Archive
from kaapana_assets.client import Kaapana, NotFound
from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.cohorts.membership import snapshot_cohort
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import SERIES
from kaapana_assets.synthetic import GeneratedStudy, get_profile
from kaapana_assets.synthetic.generator import phantom_for
from tests.helpers import SMALL

CT_ALL = CohortDefinition.model_validate({"name": "ct-all", "purpose": "test", "required_labels": ["liver"],
                                          "filter": {"modality": "CT"}})
SEED = 11  # the corpus fixture's


def truth(study: GeneratedStudy) -> np.ndarray:
    """The phantom's exact label map (liver 1, lesion 2), the reference SEG's source."""
    return phantom_for(get_profile(study.site).resized(**SMALL), SEED, study.index).labels


@pytest.fixture(scope="module")
def moved_on(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, list[GeneratedStudy]]):  # type: ignore[no-untyped-def]
    """Version 1 of ct-all cut from site-a's three CTs, one of them still without its reference
    SEG; then that SEG and site-b's studies arrive (the series table moves on: a member's row
    changes and new series appear) and version 2 is cut."""
    root = tmp_path_factory.mktemp("client")
    home = KaapanaHome(root / "home").ensure()
    (root / "cohorts").mkdir()
    (root / "cohorts" / "ct-all.yaml").write_text(yaml.safe_dump(CT_ALL.model_dump(mode="json")))
    targets, lake = Archive.for_home(home), Lake(home.lake)
    first, late = corpus["site-a"], corpus["site-a"][0]
    ingest_files([f for s in first for f in s.files if f != late.seg_file], targets, remove_sources=False)
    v1 = snapshot_cohort(lake, CT_ALL)
    assert late.seg_file is not None
    ingest_files([late.seg_file, *(f for s in corpus["site-b"] for f in s.files)], targets, remove_sources=False)
    v2 = snapshot_cohort(lake, CT_ALL)
    assert (v1.version, v2.version) == (1, 2) and lake.version(SERIES) > v1.series_table_version  # type: ignore[operator]
    return home, corpus, v1, v2


def test_a_cohort_version_reads_back_as_it_was_cut(moved_on) -> None:  # type: ignore[no-untyped-def]
    home, corpus, v1, _ = moved_on
    k = Kaapana(home.root)
    old = k.cohort("ct-all", version=1)
    assert sorted(old.series_uids) == sorted(s.series_uid for s in corpus["site-a"])  # not site-b's
    assert old.delta_versions == {"series": v1.series_table_version, "tags": v1.tags_table_version,
                                  "instances": v1.instances_table_version}  # the slices it reads (pinned)
    late = corpus["site-a"][0]
    # The member's series row as of version 1: no reference SEG yet (it has one now).
    row = old.members.filter(pl.col("series_uid") == late.series_uid).row(0, named=True)
    assert row["reference_seg_series_uids"] == [] and row["reference_labels"] == []
    assert Lake(home.lake).read(SERIES, pl.col("series_uid") == late.series_uid)["reference_seg_series_uids"][0].to_list() \
        == [late.seg_series_uid]
    assert old.case(late.series_uid).labels is None
    new = k.cohort("ct-all")
    assert new.version == 2 and len(new) == 6
    assert k.cohorts().filter(pl.col("cohort") == "ct-all")["series"].to_list() == [3, 6]
    with pytest.raises(KeyError, match="no version 7"):
        k.cohort("ct-all", version=7)


def test_cases_are_arrays_of_the_platform_volumes(moved_on) -> None:  # type: ignore[no-untyped-def]
    home, corpus, _, _ = moved_on
    # Numbered as the nnU-Net export numbers them: the definition's required labels first.
    cohort = Kaapana(home.root, cohorts=home.root.parent / "cohorts").cohort("ct-all", version=2)
    assert cohort.label_ids == {"liver": 1, "lesion": 2}
    assert Kaapana(home.root).cohort("ct-all", version=2).label_ids == {"lesion": 1, "liver": 2}  # no definition
    studies = {s.series_uid: s for site in corpus.values() for s in site}
    seen = 0
    for image, labels, geometry, series in cohort.cases():
        study = studies[series["series_uid"]]
        profile = get_profile(study.site).resized(**SMALL)
        assert image.dtype == np.float32 and image.shape == (profile.slices, profile.matrix, profile.matrix)
        assert geometry.shape == image.shape and labels is not None and labels.shape == image.shape
        assert geometry.spacing_zyx == pytest.approx(phantom_for(profile, SEED, study.index).spacing_zyx)
        expected = truth(study)
        assert np.array_equal(labels == cohort.label_ids["liver"], expected == 1)
        assert np.array_equal(labels == cohort.label_ids["lesion"], expected == 2)
        # The affine maps voxel (0, 0, 0) to the first slice's position, one slice up along z.
        assert geometry.affine[:3, 3] == pytest.approx(geometry.origin)
        step = geometry.affine @ np.array([1, 0, 0, 1]) - geometry.affine @ np.array([0, 0, 0, 1])
        assert np.linalg.norm(step[:3]) == pytest.approx(geometry.spacing_zyx[0])
        assert series["institution"] == profile.institution
        seen += 1
    assert seen == 6
    # Names instead of numbers: the volumes follow.
    swapped = Kaapana(home.root).cohort("ct-all", version=2, labels=["lesion", "liver"])
    case = swapped.case(corpus["site-b"][0].series_uid)
    assert np.array_equal(case.labels == 2, truth(corpus["site-b"][0]) == 1)


def test_export_nifti_with_its_manifest(moved_on, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    home, corpus, v1, _ = moved_on
    cohort = Kaapana(home.root).cohort("ct-all", version=1)
    manifest = json.loads(cohort.export_nifti(tmp_path / "out").read_text())
    assert manifest["cohort"] == "ct-all" and manifest["cohort_version"] == 1
    assert manifest["membership_hash"] == v1.membership_hash
    assert manifest["delta_versions"]["series"] == v1.series_table_version
    assert manifest["delta_versions"]["tags"] == v1.tags_table_version
    assert {"cohort_members", "instances"} <= set(manifest["delta_versions"])
    assert len(manifest["cases"]) == 3
    for entry in manifest["cases"]:
        case = cohort.case(entry["series_uid"])
        image = sitk.ReadImage(str(tmp_path / "out" / entry["image"]))
        assert np.array_equal(sitk.GetArrayFromImage(image), case.image)
        assert image.GetSpacing() == pytest.approx(case.geometry.spacing_zyx[::-1])
        assert image.GetOrigin() == pytest.approx(case.geometry.origin)
        if case.labels is None:  # the member cut before its reference arrived
            assert entry["label"] is None
            continue
        label = sitk.ReadImage(str(tmp_path / "out" / entry["label"]))
        assert np.array_equal(sitk.GetArrayFromImage(label), case.labels)
    assert sum(entry["label"] is None for entry in manifest["cases"]) == 1


def test_read_a_seg_back(moved_on) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    home, corpus, _, _ = moved_on
    k = Kaapana(home.root)
    study = corpus["site-b"][1]
    assert study.seg_file is not None
    sop_uid = str(pydicom.dcmread(study.seg_file, stop_before_pixels=True).SOPInstanceUID)
    for uid in (sop_uid, study.seg_series_uid):
        seg = k.read_seg(uid)  # type: ignore[arg-type]
        assert seg.source_series_uid == study.series_uid and seg.seg_sop_instance_uid == sop_uid
        assert seg.labels.shape == seg.image.shape == seg.geometry.shape
        expected = truth(study)
        for name, value in seg.label_ids.items():
            assert np.array_equal(seg.labels == value, expected == {"liver": 1, "lesion": 2}[name])
    segs = k.segs(study.study_uid)
    assert segs["series_uid"].to_list() == [study.seg_series_uid] and segs["model_name"].to_list() == [None]
    with pytest.raises(NotFound):
        k.read_seg(study.series_uid)  # a CT series is no SEG
    with pytest.raises(NotFound, match="holds no lake"):
        Kaapana(home.root / "nowhere")


def test_a_reader_of_project_a_reads_only_project_a(gateway_site) -> None:  # type: ignore[no-untyped-def]
    """The home of tests/oidc.py GatewaySite: a study of project A, one of project B."""
    from kaapana_assets.access.identity import Identity, Role
    from kaapana_assets.lake.schemas import AUDIT
    from tests.oidc import PROJECT_A

    scientist = Identity("client-scientist", frozenset({Role.SCIENTIST}), frozenset({PROJECT_A}))
    lake = Lake(gateway_site.home / "lake")
    seg_b = lake.read(SERIES, (pl.col("study_uid") == gateway_site.study_b) & (pl.col("modality") == "SEG"))
    with Kaapana(gateway_site.home, identity=scientist) as k:
        assert k.segs(gateway_site.study_b).height == 0
        with pytest.raises(NotFound):
            k.read_seg(seg_b["series_uid"][0])
        [seg_a] = k.segs(gateway_site.study_a)["series_uid"].to_list()
        assert k.read_seg(seg_a).study_uid == gateway_site.study_a
    # Without an identity (the site's own operator) the client reads everything, as before.
    assert Kaapana(gateway_site.home).segs(gateway_site.study_b).height == 1
    reads = lake.read(AUDIT, where=pl.col("user") == "client-scientist")
    assert reads.select("action", "via", "series_uid").rows() == [("client-read", "client", seg_a)]

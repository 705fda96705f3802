"""Reference segmentations: which SEG is a reference for a cohort (algorithm type, never this
platform's output), several references of one series combined per label, and overlapping
segments. Real SEGs written with highdicom over generated CT series, real ingest, real Delta."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import polars as pl
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.cohorts.harmonization import reference_segmentations
from kaapana_assets.cohorts.membership import EmptyCohort, read_cohort, snapshot_cohort
from kaapana_assets.cohorts.references import SegInstance, choose_references
from kaapana_assets.dicom.seg_segments import PLATFORM_ALGORITHM_SOURCE
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.ingest.volume import assemble_volume, seg_labels
from kaapana_assets.lake.schemas import SEG_SEGMENTS, SEGMENTATIONS, SERIES
from kaapana_assets.synthetic import GeneratedStudy, generate_site, get_profile
from kaapana_assets.synthetic.generator import phantom_for
from kaapana_assets.training.export import ExportedCase, export_cohort
from tests.helpers import SMALL

SEED = 61
MANUAL, SEMIAUTOMATIC, AUTOMATIC = "MANUAL", "SEMIAUTOMATIC", "AUTOMATIC"
PROPERTIES = {
    "liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver),
    "spleen": (codes.SCT.AnatomicalStructure, codes.SCT.Spleen),
    "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
}


class Site:
    """Three CT studies (three patients) of site-a and their phantoms' liver masks; read-only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.studies: list[GeneratedStudy] = generate_site("site-a", 3, seed=SEED, out=root / "ct", **SMALL)
        profile = get_profile("site-a").resized(**SMALL)
        self.livers = [phantom_for(profile, SEED, i).labels > 0 for i in range(3)]

    def spleen(self, index: int) -> np.ndarray:
        """A block beside the liver, never inside it."""
        mask = np.zeros_like(self.livers[index])
        mask[2:-2, 3:9, 3:9] = True
        mask &= ~self.livers[index]
        assert mask.sum() > 20
        return mask

    def tumour(self, index: int) -> np.ndarray:
        """A small blob well inside the liver."""
        liver = self.livers[index]
        z, y, x = (int(round(float(np.median(a)))) for a in np.nonzero(liver))
        mask = np.zeros_like(liver)
        mask[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = True
        mask &= liver
        assert 10 < mask.sum() < liver.sum() // 4
        return mask


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("references"))


Segment = tuple[str, np.ndarray, str, str | None]  # label, mask, algorithm type, algorithm name


def write_seg(study: GeneratedStudy, segments: list[Segment], path: Path, series_uid: str, *,
              manufacturer: str = "Reading Room", creator: str = "Doe^Jane", content_date: str = "20240301",
              content_time: str = "120000") -> Path:
    """A binary SEG over the study's CT, one segment per entry, numbered in list order;
    segments may overlap."""
    sources = [pydicom.dcmread(f) for f in study.ct_files]
    descriptions = []
    for number, (label, _, kind, algorithm) in enumerate(segments, start=1):
        category, property_type = PROPERTIES[label]
        identification = None if algorithm is None else hd.AlgorithmIdentificationSequence(
            name=algorithm, family=codes.cid7162.ArtificialIntelligence, version="2.0")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=property_type, algorithm_type=kind, algorithm_identification=identification))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack([m for _, m, _, _ in segments], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=series_uid, series_number=400, sop_instance_uid=f"{series_uid}.1", instance_number=1,
        manufacturer=manufacturer, manufacturer_model_name="Annotator", software_versions="1",
        device_serial_number="1", content_label="REF", content_creator_name=creator,
    )
    seg.ContentDate, seg.ContentTime = content_date, content_time
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def ingest(tmp_path: Path, files: list[Path]) -> Archive:
    targets = Archive.for_home(KaapanaHome(tmp_path / "home"))
    report = ingest_files(files, targets, remove_sources=False)
    assert report.count("indexed") == len(files)
    return targets


def ct_files(site: Site, *indices: int) -> list[Path]:
    return [f for i in indices for f in site.studies[i].ct_files]


def define(name: str = "liver-train", **fields: Any) -> CohortDefinition:
    return CohortDefinition.model_validate({
        "name": name, "purpose": "train", "required_labels": ["liver"],
        "filter": {"modality": "CT", "has_reference_segmentation": True}, **fields})


def labels_of(folder: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))


def case_of(exported_cases: list[ExportedCase], series_uid: str) -> ExportedCase:
    return next(c for c in exported_cases if c["series_uid"] == series_uid)


def test_two_references_with_different_labels_each_give_their_label(tmp_path: Path, site: Site) -> None:
    """A liver reference and a spleen-only reference (whose series UID sorts first) on one
    series: the export takes the liver from the one and the spleen from the other."""
    liver = [write_seg(site.studies[i], [("liver", site.livers[i], MANUAL, None)], tmp_path / f"liver{i}.dcm",
                       f"2.25.2002{i}") for i in range(3)]
    spleen = write_seg(site.studies[0], [("spleen", site.spleen(0), MANUAL, None)], tmp_path / "spleen.dcm", "2.25.20010")
    targets = ingest(tmp_path, [*ct_files(site, 0, 1, 2), *liver, spleen])
    snapshot = snapshot_cohort(targets.lake, define())
    member = snapshot.members.filter(pl.col("series_uid") == site.studies[0].series_uid).row(0, named=True)
    assert member["reference_seg_series_uids"] == ["2.25.20010", "2.25.20020"]
    assert {s["label"]: s["seg_series_uid"] for s in member["reference_sources"]} == {
        "liver": "2.25.20020", "spleen": "2.25.20010"}

    exported = export_cohort(targets.lake, targets.root, snapshot, tmp_path / "raw", ["liver"])
    assert exported.labels == {"liver": 1, "spleen": 2}
    case = case_of(exported.cases, site.studies[0].series_uid)
    labels = labels_of(exported.folder, case["case"])
    assert int((labels == 1).sum()) == int(site.livers[0].sum())
    assert int((labels == 2).sum()) == int(site.spleen(0).sum())
    assert case["reference_sources"] == {
        "liver": {"seg_series_uid": "2.25.20020", "seg_sop_instance_uid": "2.25.20020.1"},
        "spleen": {"seg_series_uid": "2.25.20010", "seg_sop_instance_uid": "2.25.20010.1"}}
    manifest = json.loads((exported.folder / "cases.json").read_text())
    assert case_of(manifest, site.studies[0].series_uid)["reference_sources"] == case["reference_sources"]
    assert exported.overlap_voxels == 0


def test_the_newer_of_two_references_with_one_label_wins(tmp_path: Path, site: Site) -> None:
    """Two liver references of one series: the one with the later Content Date/Time gives the
    liver, whichever UID sorts first; adding it made a new cohort version that records it."""
    old_mask = site.livers[0]
    new_mask = site.livers[0].copy()
    new_mask[: new_mask.shape[0] // 2] = False  # the newer reading: a smaller liver
    assert 0 < new_mask.sum() < old_mask.sum()
    others = [write_seg(site.studies[i], [("liver", site.livers[i], MANUAL, None)], tmp_path / f"liver{i}.dcm",
                        f"2.25.3002{i}") for i in (1, 2)]
    older = write_seg(site.studies[0], [("liver", old_mask, MANUAL, None)], tmp_path / "older.dcm", "2.25.30010",
                      content_date="20240105", content_time="0800")
    targets = ingest(tmp_path, [*ct_files(site, 0, 1, 2), *others, older])
    first = snapshot_cohort(targets.lake, define())
    newer = write_seg(site.studies[0], [("liver", new_mask, SEMIAUTOMATIC, "Slicer GrowCut")], tmp_path / "newer.dcm",
                      "2.25.30099", content_date="20240601", content_time="093000.5")
    ingest_files([newer], targets, remove_sources=False)
    second = snapshot_cohort(targets.lake, define())
    assert (first.version, second.version) == (1, 2) and second.created

    def liver_source(snapshot: Any) -> str:
        member = snapshot.members.filter(pl.col("series_uid") == site.studies[0].series_uid).row(0, named=True)
        return next(s["seg_sop_instance_uid"] for s in member["reference_sources"] if s["label"] == "liver")

    assert liver_source(first) == "2.25.30010.1" and liver_source(second) == "2.25.30099.1"
    assert liver_source(read_cohort(targets.lake, "liver-train", 2)) == "2.25.30099.1"  # as recorded
    exported = export_cohort(targets.lake, targets.root, second, tmp_path / "raw", ["liver"])
    case = case_of(exported.cases, site.studies[0].series_uid)
    assert int((labels_of(exported.folder, case["case"]) == 1).sum()) == int(new_mask.sum())
    assert case["reference_sources"]["liver"]["seg_sop_instance_uid"] == "2.25.30099.1"

    # The rule itself, whichever order the SEGs come in: the newer wins; at one time, the lower UID.
    a = SegInstance("2.25.9", "2.25.90", frozenset({"liver"}), frozenset({MANUAL}), False, "20240601093000.000000")
    b = SegInstance("2.25.1", "2.25.10", frozenset({"liver"}), frozenset({MANUAL}), False, "20240105080000.000000")
    c = SegInstance("2.25.5", "2.25.50", frozenset({"liver"}), frozenset({MANUAL}), False, "20240601093000.000000")
    for order in ([a, b], [b, a]):
        assert choose_references(order, [MANUAL]).sources[0].seg_sop_instance_uid == "2.25.9"
    assert choose_references([a, b, c], [MANUAL]).sources[0].seg_sop_instance_uid == "2.25.5"


def test_a_seg_of_another_ai_tool_is_no_reference(tmp_path: Path, site: Site) -> None:
    """An AUTOMATIC SEG (TotalSegmentator) as a series' only SEG: the series is not annotated
    for a cohort that requires a reference (nor exported), unless the cohort accepts AUTOMATIC;
    the series table still lists the SEG, and the reference check agrees with membership."""
    auto = write_seg(site.studies[0], [("liver", site.livers[0], AUTOMATIC, "TotalSegmentator"),
                                       ("spleen", site.spleen(0), AUTOMATIC, "TotalSegmentator")],
                     tmp_path / "auto.dcm", "2.25.40010", manufacturer="Wasserthal", creator="")
    manual = [write_seg(site.studies[i], [("liver", site.livers[i], MANUAL, None)], tmp_path / f"liver{i}.dcm",
                        f"2.25.4002{i}") for i in (1, 2)]
    targets = ingest(tmp_path, [*ct_files(site, 0, 1, 2), auto, *manual])
    lake = targets.lake
    ct0 = site.studies[0].series_uid
    assert lake.read(SERIES, pl.col("series_uid") == ct0)["reference_seg_series_uids"][0].to_list() == ["2.25.40010"]
    recorded = lake.read(SEG_SEGMENTS, pl.col("series_uid") == "2.25.40010").sort("segment_number")
    assert recorded["algorithm_type"].to_list() == [AUTOMATIC, AUTOMATIC]
    assert recorded["algorithm_name"].to_list() == ["TotalSegmentator"] * 2
    assert recorded["manufacturer"].to_list() == ["Wasserthal"] * 2

    snapshot = snapshot_cohort(lake, define())
    assert set(snapshot.members["series_uid"].to_list()) == {site.studies[1].series_uid, site.studies[2].series_uid}
    exported = export_cohort(lake, targets.root, snapshot, tmp_path / "raw", ["liver"])
    assert ct0 not in {c["series_uid"] for c in exported.cases} and len(exported.cases) == 2

    # The check sees what membership sees: without the filter, the series has no reference.
    unfiltered = define(name="all-ct", filter={"modality": "CT"})
    outcome = reference_segmentations(snapshot_cohort(lake, unfiltered), unfiltered)
    assert [(o["series_uid"], o["problem"]) for o in outcome.offending] == [(ct0, "no reference SEG")]

    # A cohort that accepts automatic annotations takes it: a new version, with its labels.
    accepting = define(reference_algorithm_types=[MANUAL, SEMIAUTOMATIC, AUTOMATIC])
    widened = snapshot_cohort(lake, accepting)
    assert widened.version == 2 and ct0 in widened.members["series_uid"].to_list()
    member = widened.members.filter(pl.col("series_uid") == ct0).row(0, named=True)
    assert member["reference_labels"] == ["liver", "spleen"]


def test_our_own_seg_is_no_reference_even_without_its_segmentations_row(tmp_path: Path, site: Site) -> None:
    """A SEG of this platform's models, indexed with no `segmentations` row (a crash between
    commit_segs' writes; or a SEG another site of the platform wrote): its own attributes make
    it ours, so it is no reference, even for a cohort that accepts AUTOMATIC."""
    from kaapana_assets.segmentation.dicom_seg import encode_seg, model_seg

    volume = assemble_volume(site.studies[0].ct_files)
    seg, _ = model_seg(volume, site.livers[0].astype(np.uint8), {0: "background", 1: "liver"}, "nnunet-liver-train", "4")
    ours = tmp_path / "ours.dcm"
    ours.write_bytes(encode_seg(seg))
    manual = [write_seg(site.studies[i], [("liver", site.livers[i], MANUAL, None)], tmp_path / f"liver{i}.dcm",
                        f"2.25.5002{i}") for i in (1, 2)]
    targets = ingest(tmp_path, [*ct_files(site, 0, 1, 2), ours, *manual])
    lake = targets.lake
    assert not lake.exists(SEGMENTATIONS) or lake.read(SEGMENTATIONS).height == 0
    row = lake.read(SEG_SEGMENTS, pl.col("sop_instance_uid") == str(seg.SOPInstanceUID)).row(0, named=True)
    assert (row["algorithm_source"], row["algorithm_type"]) == (PLATFORM_ALGORITHM_SOURCE, AUTOMATIC)

    annotated = {site.studies[1].series_uid, site.studies[2].series_uid}
    assert set(snapshot_cohort(lake, define()).members["series_uid"].to_list()) == annotated
    anything_automatic = define(name="auto", reference_algorithm_types=[MANUAL, SEMIAUTOMATIC, AUTOMATIC])
    assert set(snapshot_cohort(lake, anything_automatic).members["series_uid"].to_list()) == annotated
    with pytest.raises(EmptyCohort):
        snapshot_cohort(lake, define(name="only-ours", filter={"modality": "CT", "has_reference_segmentation": True,
                                                               "exclude_series": sorted(annotated)}))


def test_overlapping_segments_the_smaller_or_the_prioritized_on_top(tmp_path: Path, site: Site) -> None:
    """A tumour inside the liver, the liver with the higher segment number: the tumour survives
    by default (the smaller on top) and by an explicit priority; a priority that puts the
    liver on top hides it. The export counts the overlap."""
    liver, tumour = site.livers[0], site.tumour(0)
    overlap = write_seg(site.studies[0], [("tumor", tumour, MANUAL, None), ("liver", liver, MANUAL, None)],
                        tmp_path / "overlap.dcm", "2.25.60010")
    volume = assemble_volume(site.studies[0].ct_files)
    ids = {"liver": 1, "tumor": 2}
    default = seg_labels(overlap, volume, ids)
    assert int((default == 2).sum()) == int(tumour.sum())
    assert int((default == 1).sum()) == int(liver.sum() - tumour.sum())
    assert np.array_equal(seg_labels(overlap, volume, ids, ["tumor", "liver"]), default)
    assert int((seg_labels(overlap, volume, ids, ["liver"]) == 2).sum()) == 0

    others = [write_seg(site.studies[i], [("liver", site.livers[i], MANUAL, None)], tmp_path / f"liver{i}.dcm",
                        f"2.25.6002{i}") for i in (1, 2)]
    targets = ingest(tmp_path, [*ct_files(site, 0, 1, 2), overlap, *others])
    for priority, tumour_voxels in (([], tumour.sum()), (["tumor", "liver"], tumour.sum()), (["liver", "tumor"], 0)):
        snapshot = snapshot_cohort(targets.lake, define(label_priority=priority))
        folder = tmp_path / f"raw-{'-'.join(priority) or 'default'}"
        exported = export_cohort(targets.lake, targets.root, snapshot, folder, ["liver"])
        case = case_of(exported.cases, site.studies[0].series_uid)
        labels = labels_of(folder, case["case"])
        assert int((labels == exported.labels["tumor"]).sum()) == int(tumour_voxels), priority
        assert exported.overlap_voxels == case["overlap_voxels"] == int(tumour.sum())
        hidden = "liver" if tumour_voxels else "tumor"
        assert exported.hidden_voxels == {hidden: int(tumour.sum())}
    # Each overlap rule is its own cohort version (the label maps differ).
    assert snapshot.version == 3


class MaskPredictor:
    """predict_single_npy_array as nnUNetPredictor has it, predicting one fixed mask as label 1."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask.astype(np.uint8)

    def predict_single_npy_array(self, image: np.ndarray, properties: dict[str, Any], *args: Any) -> np.ndarray:
        assert image.shape[1:] == self.mask.shape
        return self.mask


def test_evaluation_reads_each_label_from_its_reference(tmp_path: Path, site: Site) -> None:
    """The two-reference series of the first test, evaluated: a prediction equal to the liver
    mask scores Dice 1.0, measured against the liver's own SEG. Our prediction, written back
    by commit_segs, has its segments recorded and does not become a reference."""
    from kaapana_assets.evaluation.evaluate import evaluate_cohort
    from kaapana_assets.segmentation.models import LoadedModel

    liver = write_seg(site.studies[0], [("liver", site.livers[0], MANUAL, None)], tmp_path / "liver.dcm", "2.25.70020")
    spleen = write_seg(site.studies[0], [("spleen", site.spleen(0), MANUAL, None)], tmp_path / "spleen.dcm", "2.25.70010")
    targets = ingest(tmp_path, [*site.studies[0].ct_files, liver, spleen])
    definition = define(name="liver-test", purpose="test")
    snapshot = snapshot_cohort(targets.lake, definition)
    model = LoadedModel("nnunet-liver-test", "1", Path("unused"), MaskPredictor(site.livers[0]),
                        {0: "background", 1: "liver"})
    evaluation = evaluate_cohort(targets, snapshot, model)
    row = evaluation.rows.filter(pl.col("label") == "liver").row(0, named=True)
    assert row["dice"] == pytest.approx(1.0)
    assert row["reference_voxels"] == row["predicted_voxels"] == int(site.livers[0].sum())
    assert row["reference_seg_series_uid"] == "2.25.70020"

    ours = targets.lake.read(SEG_SEGMENTS, pl.col("sop_instance_uid") == row["predicted_seg_sop_instance_uid"])
    assert ours["algorithm_source"].to_list() == [PLATFORM_ALGORITHM_SOURCE]
    again = snapshot_cohort(targets.lake, definition)
    member = again.members.row(0, named=True)
    assert member["reference_seg_series_uids"] == ["2.25.70010", "2.25.70020"]


def test_a_seg_indexed_without_its_segments_is_no_reference_until_they_are_recorded(
        tmp_path: Path, site: Site) -> None:
    """A home indexed before `seg_segments` existed (or a reconcile cut short): its SEGs'
    provenance is unknown, so they are no references until the cohorts asset records it."""

    segs = [write_seg(site.studies[i], [("liver", site.livers[i], MANUAL, None)], tmp_path / f"liver{i}.dcm",
                      f"2.25.8002{i}") for i in (0, 1)]
    targets = ingest(tmp_path, [*ct_files(site, 0, 1), *segs])
    targets.lake.delete(SEG_SEGMENTS, "sop_instance_uid = '2.25.80020.1'")
    assert snapshot_cohort(targets.lake, define()).members["series_uid"].to_list() == [site.studies[1].series_uid]
    assert targets.reindex_segments() == 1
    assert targets.reindex_segments() == 0
    healed = snapshot_cohort(targets.lake, define())
    assert healed.version == 2
    assert set(healed.members["series_uid"].to_list()) == {site.studies[0].series_uid, site.studies[1].series_uid}

"""Segmentation: new studies segmented with the production model, as DICOM SEG with statistics."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import highdicom as hd
import numpy as np
import polars as pl
import pytest
import torch

from bench.training_site import TRAIN_GRID
from kaapana_assets import nnunet
from kaapana_assets.dicomweb.links import SegView, viewer_url
from kaapana_assets.environment import DEFAULT_VIEWER_URL
from kaapana_assets.ingest.assets import dicom_studies, quarantine
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import (
    INSTANCES,
    SEG_SEGMENTS,
    SEGMENTATIONS,
    SERIES,
    SERIES_PROJECTS,
    STUDIES,
    TableSpec,
)
from kaapana_assets.nnunet.registry import ModelVersionNotFound, find_version
from kaapana_assets.projects.assignment import projects_of_series
from kaapana_assets.projects.membership import DEFAULT_PROJECT
from kaapana_assets.segmentation.assets import segmentations
from kaapana_assets.synthetic import generate_site, get_profile
from kaapana_assets.synthetic.generator import phantom_for
from kaapana_assets.training.tracking import Tracking
from resources import MlflowResource
from sensors.incoming import incoming_studies
from tests.helpers import dcmqi_labels, segimage2itkimage
from tests.tools import dciodvfy_errors

SEED = 77  # studies the model never saw


def _new_study(trained_site, index: int):  # type: ignore[no-untyped-def]
    """An unannotated study of the same site, in the spool."""
    study = generate_site("site-a", 1, seed=SEED, out=trained_site.root / f"new{index}", first_index=index, **TRAIN_GRID)[0]
    spool = trained_site.home.incoming / f"new{index}"
    spool.mkdir(parents=True, exist_ok=True)
    for f in study.ct_files:
        shutil.copy(f, spool / f.name)
    return study


def _segment(trained_site, study, resources=None):  # type: ignore[no-untyped-def]
    trained_site.instance.add_dynamic_partitions("studies", [study.study_uid])
    return dg.materialize([dicom_studies, segmentations], partition_key=study.study_uid,
                          instance=trained_site.instance, resources=resources or trained_site.resources,
                          raise_on_error=False)


@pytest.mark.slow  # a trained nnU-Net predicts (the session trained_site)
def test_new_study_is_segmented_as_valid_dicom_seg(trained_site) -> None:  # type: ignore[no-untyped-def]
    study = _new_study(trained_site, 0)
    result = _segment(trained_site, study)
    assert result.success, result.all_events
    md = result.asset_materializations_for_node("segmentations")[0].metadata
    assert md["model"].value == "nnunet-liver-train:v1"
    assert "data:image/png;base64," in md["overlay"].value
    # The link opens the new SEG over the CT it segments, in the viewer's segmentation mode.
    assert isinstance(md["viewer"], dg.UrlMetadataValue)
    assert md["viewer"].value == viewer_url(DEFAULT_VIEWER_URL, study.study_uid,
                                            SegView(md["seg_series_uid"].value, study.series_uid))
    lake = Lake(trained_site.home.lake)

    # The SEG is archived and indexed: a series row with modality SEG pointing at the CT.
    seg_series = lake.read(SERIES, pl.col("series_uid") == md["seg_series_uid"].value).row(0, named=True)
    assert seg_series["modality"] == "SEG" and seg_series["referenced_series_uids"] == [study.series_uid]
    ct_series = lake.read(SERIES, pl.col("series_uid") == study.series_uid).row(0, named=True)
    assert ct_series["reference_seg_series_uids"] == [md["seg_series_uid"].value]
    path = lake.read(INSTANCES, pl.col("sop_instance_uid") == md["seg_sop_instance_uid"].value)["archive_path"][0]
    seg_file = trained_site.home.archive / path

    seg = hd.seg.segread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert "liver" in labels
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("nnunet-liver-train", "1")
    assert dciodvfy_errors(seg_file) == []

    # Statistics per label, in the segmentations table.
    stats = lake.read(SEGMENTATIONS, pl.col("study_uid") == study.study_uid)
    liver = stats.filter(pl.col("label") == "liver").row(0, named=True)
    assert liver["voxel_count"] > 0 and liver["volume_ml"] > 0 and len(liver["bbox"]) == 6
    assert 0 < liver["mean_hu"] < 150  # the phantom liver is ~60 HU

    # Dice against the synthetic ground truth, reported; a tiny model must beat a trivial baseline.
    from kaapana_assets.ingest.volume import assemble_volume, seg_labels

    volume = assemble_volume(study.ct_files)
    predicted = seg_labels(seg_file, volume, {"liver": 1, "lesion": 2})
    truth = phantom_for(get_profile("site-a").resized(**TRAIN_GRID), SEED, 0).labels
    organ_dice = nnunet.dice((predicted > 0).astype(np.uint8), (truth > 0).astype(np.uint8), 1)
    baseline = nnunet.dice((volume.hu > -500).astype(np.uint8), (truth > 0).astype(np.uint8), 1)
    print(f"\nDice (liver incl. lesions) of the tiny test model: {organ_dice:.3f}; trivial baseline {baseline:.3f}")
    assert organ_dice > baseline

    # Segmenting again with the same model version changes nothing.
    again = dg.materialize([segmentations], partition_key=study.study_uid, instance=trained_site.instance,
                           resources=trained_site.resources)
    md2 = again.asset_materializations_for_node("segmentations")[0].metadata
    assert md2["reused_existing"].value is True
    assert again.asset_materializations_for_node("segmentations")[0].tags["dagster/data_version"] == \
        result.asset_materializations_for_node("segmentations")[0].tags["dagster/data_version"]


@pytest.mark.slow  # a trained nnU-Net predicts (the session trained_site)
def test_no_production_model_fails_with_a_reason(trained_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = _new_study(trained_site, 1)
    empty = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}", artifact_root=(tmp_path / "art").as_uri())
    result = _segment(trained_site, study, {**trained_site.resources, "mlflow": empty})
    failure = result.failure_data_for_node("segmentations")
    assert "holds the alias 'production'" in failure.error.message and "kaapana model import" in failure.error.message  # type: ignore[union-attr]


@pytest.mark.slow  # a trained nnU-Net predicts (the session trained_site)
def test_model_import(trained_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.cli import main

    tracking = trained_site.tracking()
    folder = tracking.download(find_version(tracking, "nnunet-liver-train"), tmp_path / "dl")
    # As if it came from elsewhere: a trainer class nnU-Net cannot look up on CPU-only torch.
    checkpoint_path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerNoMirroring"
    torch.save(checkpoint, checkpoint_path)
    assert main(["model", "import", str(folder), "--name", "imported-liver", "--promote",
                 "--home", str(trained_site.home.root)]) == 0
    version = find_version(tracking, "imported-liver")
    assert version.tags["kaapana.original_trainers"] == "nnUNetTrainerNoMirroring"
    loaded = nnunet.load_predictor(tracking.download(version, tmp_path / "again"), "cpu")
    assert loaded is not None
    (tmp_path / "not-a-model").mkdir()
    assert main(["model", "import", str(tmp_path / "not-a-model"), "--name", "x", "--home", str(trained_site.home.root)]) == 2


@pytest.mark.slow  # a trained nnU-Net predicts (the session trained_site)
def test_sensor_ingest_and_automatic_segmentation(trained_site) -> None:  # type: ignore[no-untyped-def]
    """The chain runs on its own: spool → sensor → ingest run → automation → segmentation."""
    from resources import ArchiveResource

    study = _new_study(trained_site, 2)
    resources = {**trained_site.resources, "archive": ArchiveResource(home=str(trained_site.home.root), quiet_period_s=0.5)}
    # The sensor brings its own target jobs (ingest_study, quarantine_unreadable).
    defs = dg.Definitions(assets=[dicom_studies, quarantine, segmentations], sensors=[incoming_studies],
                          resources=resources)
    instance = trained_site.instance
    # The automation sensor ticks all along; eager conditions react to what changed since.
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    requests = []
    cursor = None
    for _ in range(3):
        with dg.partition_loading_context(dynamic_partitions_store=instance):
            tick = incoming_studies.evaluate_tick(dg.build_sensor_context(
                instance=instance, instance_ref=instance.get_ref(), cursor=cursor, definitions=defs, resources=resources))
        cursor = tick.cursor
        for req in tick.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
        requests = [r for r in tick.run_requests if r.partition_key == study.study_uid]
        if requests:
            break
        time.sleep(0.6)
    assert len(requests) == 1
    # The fallback path (a study ingested alone, e.g. while MLflow was unreachable): the
    # request's files through ingest_study, then the automation segments it.
    files = {"dicom_studies": requests[0].run_config["ops"]["dicom_studies"]}
    ingest = defs.resolve_job_def("ingest_study").execute_in_process(
        run_config={"ops": files}, partition_key=study.study_uid, instance=instance)
    assert ingest.success

    evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    requested = evaluation.get_requested_partitions(dg.AssetKey("segmentations"))
    assert study.study_uid in requested
    run = dg.materialize([segmentations], partition_key=study.study_uid, instance=instance, resources=resources)
    assert run.success
    again = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=evaluation.cursor)
    assert study.study_uid not in again.get_requested_partitions(dg.AssetKey("segmentations"))


@pytest.mark.slow  # a trained nnU-Net predicts (the session trained_site)
def test_model_promotion_requests_resegmentation(trained_site) -> None:  # type: ignore[no-untyped-def]
    from sensors.model_promotion import model_promotion

    tracking = trained_site.tracking()
    resources = trained_site.resources

    defs = dg.Definitions(assets=[segmentations], sensors=[model_promotion], resources=resources)

    def tick(cursor):  # type: ignore[no-untyped-def]
        with dg.partition_loading_context(dynamic_partitions_store=trained_site.instance):
            return model_promotion.evaluate_tick(dg.build_sensor_context(
                instance=trained_site.instance, instance_ref=trained_site.instance.get_ref(), cursor=cursor,
                resources=resources, definitions=defs))

    first = tick(None)
    assert not first.run_requests and first.cursor == "nnunet-liver-train:1"
    assert not tick(first.cursor).run_requests
    current = find_version(tracking, "nnunet-liver-train")
    newest = int(tracking.register(current.run_id, "model", "nnunet-liver-train", tags={"kaapana.validation": "passed"}).version)
    tracking.promote("nnunet-liver-train", newest)
    try:
        moved = tick(first.cursor)
        segmented = set(Lake(trained_site.home.lake).read(SEGMENTATIONS)["study_uid"].to_list())
        requested = {r.partition_key for r in moved.run_requests}
        assert segmented <= requested and moved.cursor == f"nnunet-liver-train:{newest}"
        assert all(r.run_key.startswith(f"nnunet-liver-train:{newest}:") for r in moved.run_requests)
    finally:
        tracking.promote("nnunet-liver-train", 1)


@pytest.mark.slow  # a trained nnU-Net predicts (the session trained_site)
def test_compressed_study_is_segmented(trained_site) -> None:  # type: ignore[no-untyped-def]
    """A study a PACS sends as JPEG Lossless and another as JPEG 2000 (re-encoded by dcmtk and
    GDCM) go through ingest, volume assembly and prediction into a valid DICOM SEG."""
    from kaapana_assets.synthetic.transcode import transcode

    for index, encoding in ((10, "jpeg_lossless_sv1"), (11, "jpeg2000_lossless")):
        study = generate_site("site-a", 1, seed=SEED, out=trained_site.root / f"new{index}", first_index=index,
                              **TRAIN_GRID)[0]
        spool = trained_site.home.incoming / f"new{index}"
        for f in study.ct_files:
            transcode(f, spool / f.name, encoding)
        result = _segment(trained_site, study)
        assert result.success, (encoding, result.all_events)
        lake = Lake(trained_site.home.lake)
        syntaxes = lake.read(INSTANCES, pl.col("series_uid") == study.series_uid)["transfer_syntax_uid"].unique()
        assert syntaxes.to_list() == [{"jpeg_lossless_sv1": "1.2.840.10008.1.2.4.70",
                                       "jpeg2000_lossless": "1.2.840.10008.1.2.4.90"}[encoding]]
        md = result.asset_materializations_for_node("segmentations")[0].metadata
        path = lake.read(INSTANCES, pl.col("sop_instance_uid") == md["seg_sop_instance_uid"].value)["archive_path"][0]
        liver = lake.read(SEGMENTATIONS, (pl.col("study_uid") == study.study_uid) & (pl.col("label") == "liver"))
        assert liver["voxel_count"][0] > 0
        assert dciodvfy_errors(trained_site.home.archive / path) == []


# Fast tier: SEG writing, indexing and the model cache, with a stand-in predictor that returns
# the phantom's own labels (the SEG and index code paths are the asset's, nnU-Net is not run).

LABEL_NAMES = {0: "background", 1: "liver", 2: "lesion"}


class PhantomPredictor:
    """predict_single_npy_array as nnUNetPredictor has it: the phantom's labels, counted."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels, self.calls = labels, 0

    def predict_single_npy_array(self, image: np.ndarray, properties: dict[str, Any], *args: Any) -> np.ndarray:
        self.calls += 1
        assert image.shape[1:] == self.labels.shape
        return self.labels


def _ingested_study(tmp_path: Path, site: str = "site-a", index: int = 0):  # type: ignore[no-untyped-def]
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from tests.helpers import SMALL

    study = generate_site(site, 1, seed=SEED, out=tmp_path / "gen", first_index=index, with_annotations=True,
                          **SMALL)[0]
    targets = Archive.for_home(KaapanaHome(tmp_path / "home").ensure())
    ingest_files(study.ct_files, targets, remove_sources=False)
    truth = phantom_for(get_profile(site).resized(**SMALL), SEED, index).labels
    return study, targets, truth


def _model(truth: np.ndarray, version: str = "3"):  # type: ignore[no-untyped-def]
    from kaapana_assets.segmentation.models import LoadedModel

    return LoadedModel("nnunet-liver-test", version, Path("unused"), PhantomPredictor(truth), LABEL_NAMES)


def test_seg_index_row_is_what_the_parser_reads(tmp_path: Path) -> None:
    """The instances row built from the SEG in memory equals parse_header on its bytes, for a
    model's SEG and a reference SEG of every site profile (character sets, pixel conventions)."""
    import pydicom

    from kaapana_assets.ingest.headers import parse_header
    from kaapana_assets.ingest.volume import assemble_volume
    from kaapana_assets.segmentation.dicom_seg import encode_seg, model_seg, seg_instance_row
    from tests.helpers import SMALL

    for i, site in enumerate(("site-a", "site-b", "site-c")):
        study = generate_site(site, 1, seed=SEED, out=tmp_path, first_index=i, with_annotations=True, **SMALL)[0]
        truth = phantom_for(get_profile(site).resized(**SMALL), SEED, i).labels
        seg, present = model_seg(assemble_volume(study.ct_files), truth, LABEL_NAMES, "nnunet-liver-test", "3")
        assert set(present) == {LABEL_NAMES[v] for v in np.unique(truth) if v}
        parsed = parse_header(encode_seg(seg)).as_dict()
        assert seg_instance_row(seg, str(seg.file_meta.TransferSyntaxUID)) == parsed
        assert parsed["modality"] == "SEG" and parsed["referenced_series_uids"] == [study.series_uid]
        reference = pydicom.dcmread(study.seg_file)
        assert seg_instance_row(reference, str(reference.file_meta.TransferSyntaxUID)) == \
            parse_header(study.seg_file.read_bytes()).as_dict()


def test_segment_study_indexes_the_seg_as_ingest_would(tmp_path: Path) -> None:
    """segment_study archives and indexes its SEG without ingest's re-parse: the instances,
    series and studies rows equal those of ingesting the same file."""
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.ingest.volume import seg_labels
    from kaapana_assets.segmentation.segment import segment_study

    study, targets, truth = _ingested_study(tmp_path)
    model = _model(truth)
    result = segment_study(targets, study.study_uid, model)
    assert not result.reused and model.predictor.calls == 1
    assert set(result.versions) == {"instances", "seg_segments", "series", "studies", "segmentations",
                                    "series_projects"}
    lake = targets.lake
    seg_row = lake.read(INSTANCES, pl.col("sop_instance_uid") == result.seg_sop_uid).row(0, named=True)
    seg_file = targets.root / seg_row["archive_path"]

    # The same study and the same SEG bytes through ingest, in another home.
    other = Archive.for_home(KaapanaHome(tmp_path / "other").ensure())
    ingest_files(study.ct_files, other, remove_sources=False)
    report = ingest_files([seg_file], other, remove_sources=False)
    assert report.count("indexed") == 1

    def rows(t: Archive, table: TableSpec, key: str, stamp: str) -> list[dict[str, Any]]:
        return t.lake.read(table, pl.col("study_uid") == study.study_uid).drop(stamp).sort(key).to_dicts()

    for table, key, stamp in ((INSTANCES, "sop_instance_uid", "ingested_at"), (SERIES, "series_uid", "updated_at"),
                              (STUDIES, "study_uid", "updated_at"), (SEG_SEGMENTS, "segment_number", "indexed_at")):
        assert rows(targets, table, key, stamp) == rows(other, table, key, stamp), table.name
    assert (targets.root / seg_row["archive_path"]).read_bytes() == (other.root / seg_row["archive_path"]).read_bytes()

    # The SEG reads back as the prediction; the statistics are the prediction's.
    from kaapana_assets.ingest.volume import assemble_volume

    volume = assemble_volume(study.ct_files)
    assert np.array_equal(seg_labels(seg_file, volume, {"liver": 1, "lesion": 2}), truth)
    liver = next(s for s in result.statistics if s["label"] == "liver")
    assert liver["voxel_count"] == int((truth == 1).sum())
    # Valid for dciodvfy, and dcmqi (3D Slicer's reader) reads the same labels as ours.
    assert dciodvfy_errors(seg_file) == []

    try:
        binary = segimage2itkimage()
    except pytest.skip.Exception:
        binary = None
    if binary:
        theirs, ours = dcmqi_labels(binary, seg_file, study.ct_files, tmp_path / "dcmqi")
        assert ours.any() and np.array_equal(theirs, ours)

    # Again with the same model version: reused, nothing predicted or written.
    again = segment_study(targets, study.study_uid, model)
    assert again.reused and model.predictor.calls == 1
    assert sorted((s["label"], s["voxel_count"], s["bbox"]) for s in again.statistics) == \
        sorted((s["label"], s["voxel_count"], s["bbox"]) for s in result.statistics)


def test_segment_study_recovers_from_a_stop_between_archive_index_and_statistics(tmp_path: Path) -> None:
    """A run that stopped after archiving (not indexed) is replaced; one that stopped after
    indexing (no statistics) finishes from the indexed SEG without predicting again."""
    from kaapana_assets.archive.layout import archive_relpath
    from kaapana_assets.segmentation.dicom_seg import seg_uids
    from kaapana_assets.segmentation.segment import segment_study

    study, targets, truth = _ingested_study(tmp_path)
    model = _model(truth)
    seg_series_uid, seg_sop_uid = seg_uids(study.series_uid, model.name, model.version)
    orphan = targets.root / archive_relpath(study.study_uid, seg_series_uid, seg_sop_uid)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"a SEG archived by a run that stopped before indexing it")
    first = segment_study(targets, study.study_uid, model)
    row = targets.lake.read(INSTANCES, pl.col("sop_instance_uid") == seg_sop_uid).row(0, named=True)
    import hashlib

    assert hashlib.sha256(orphan.read_bytes()).hexdigest() == row["sha256"]
    assert hd.seg.segread(orphan).SOPInstanceUID == seg_sop_uid

    targets.lake.delete(SEGMENTATIONS, f"seg_sop_instance_uid = '{seg_sop_uid}'")  # stopped before statistics
    archived = orphan.read_bytes()
    model.predictor.calls = 0
    second = segment_study(targets, study.study_uid, model)
    assert model.predictor.calls == 0 and not second.reused
    assert second.statistics == first.statistics and orphan.read_bytes() == archived
    assert targets.lake.read(SEGMENTATIONS, pl.col("seg_sop_instance_uid") == seg_sop_uid).height == len(first.statistics)


def test_loaded_models_are_cached_per_name_version_and_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kaapana_assets.segmentation import models

    loads: list[tuple[str, str]] = []

    def load_predictor(folder: Path, device: str) -> object:
        time.sleep(0.05)  # long enough for the threads below to overlap
        loads.append((folder.name, device))
        return object()

    monkeypatch.setattr(models.nnunet, "load_predictor", load_predictor)
    monkeypatch.setattr(models, "_LOADED", {})
    # A registry of its own holding versions 1 and 2 of `liver` (their folders already in the cache).
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "mlartifacts").as_uri())
    with tracking.run("liver") as run:
        pass
    for _ in range(2):
        tracking.register(run.info.run_id, "model", "liver", tags={})
    tracking.promote("liver", 1)
    for version in ("1", "2"):
        folder = tmp_path / "models" / "liver" / f"v{version}"
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text('{"labels": {"background": 0, "liver": 1}}')

    threads = [threading.Thread(target=models.production_model, args=(tracking, "liver", tmp_path / "models", "cpu"))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = models.production_model(tracking, "liver", tmp_path / "models", "cpu")
    assert loads == [("v1", "cpu")] and first.label_names == {0: "background", 1: "liver"}
    assert models.production_model(tracking, "liver", tmp_path / "models", "cuda") is not first
    tracking.promote("liver", 2)  # the alias moved: the next study gets the new version
    assert models.production_model(tracking, "liver", tmp_path / "models", "cpu").version == "2"
    tracking.promote("liver", 1)
    assert models.production_model(tracking, "liver", tmp_path / "models", "cpu") is first
    assert loads == [("v1", "cpu"), ("v1", "cuda"), ("v2", "cpu")]


def test_a_pinned_version_in_the_cache_loads_without_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kaapana_assets.segmentation import models

    monkeypatch.setattr(models.nnunet, "load_predictor", lambda folder, device: object())
    monkeypatch.setattr(models, "_LOADED", {})
    # A registry that holds no version at all: a version that loads was not looked up there.
    store = tmp_path / "registry" / "mlflow.db"
    tracking = Tracking(f"sqlite:///{store}", (tmp_path / "mlartifacts").as_uri())
    folder = tmp_path / "models" / "liver" / "v3"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text('{"labels": {"background": 0, "liver": 1}}')
    loaded = models.pinned_model(tracking, "liver", "3", tmp_path / "models", "cpu")
    assert (loaded.version, loaded.folder, loaded.ref) == ("3", folder, "liver:v3")
    # Not in the cache and not in the registry: a clear error, nothing half-made in the cache
    # (and no registry store made by asking).
    with pytest.raises(ModelVersionNotFound, match="no version 4"):
        models.pinned_model(tracking, "liver", "4", tmp_path / "models", "cpu")
    assert sorted(p.name for p in (tmp_path / "models" / "liver").iterdir()) == ["v3"]
    assert not store.parent.exists()


def _ingested_burst(tmp_path: Path, count: int):  # type: ignore[no-untyped-def]
    """`count` small studies of one site ingested: (targets, their study UIDs, the phantom's labels)."""
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from tests.helpers import SMALL

    studies = generate_site("site-a", count, seed=SEED, out=tmp_path / "gen", **SMALL)
    targets = Archive.for_home(KaapanaHome(tmp_path / "home").ensure())
    ingest_files([f for s in studies for f in s.ct_files], targets, remove_sources=False)
    truth = phantom_for(get_profile("site-a").resized(**SMALL), SEED, 0).labels
    return targets, [s.study_uid for s in studies], truth


def test_a_burst_commits_its_segs_once_and_keeps_what_was_archived_when_a_study_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """segment_studies archives each SEG as it is built and commits the index and the
    statistics of all of them together (one commit per table); a study that raises leaves the
    ones before it committed, and a study with nothing to segment is skipped with its reason.
    The run reads the index once for all its studies, reused or not."""
    from kaapana_assets.segmentation.segment import segment_studies

    targets, uids, truth = _ingested_burst(tmp_path, 3)
    lake = targets.lake
    tables = (INSTANCES, SEG_SEGMENTS, SERIES, STUDIES, SEGMENTATIONS, SERIES_PROJECTS)
    before = lake.versions(tables)

    seen: list[str] = []
    results, skipped = segment_studies(targets, [*uids[:2], "2.25.1"], _model(truth),
                                       lambda done, total, r: seen.append(f"{done}/{total} {r.study_uid}"))
    assert [r.study_uid for r in results] == uids[:2] and "2.25.1" in skipped
    assert seen == [f"1/3 {uids[0]}", f"2/3 {uids[1]}"]
    after = lake.versions(tables)
    assert all(after[t] == (before[t] or 0) + 1 for t in before if before[t] is not None), (before, after)
    assert all(r.versions == after for r in results)
    segs = lake.read(SEGMENTATIONS)
    assert set(segs["study_uid"].to_list()) == set(uids[:2])
    # Each SEG series joins the projects of the series it segments (here the default project).
    assert projects_of_series(lake, segs["seg_series_uid"].unique().to_list()) == {
        seg_series: [DEFAULT_PROJECT] for seg_series in segs["seg_series_uid"].to_list()}
    assert lake.read(INSTANCES, pl.col("sop_instance_uid").is_in([r.seg_sop_uid for r in results])).height == 2

    class FailsSecond(PhantomPredictor):
        def predict_single_npy_array(self, image: np.ndarray, properties: dict[str, Any], *args: Any) -> np.ndarray:
            if self.calls == 1:
                raise RuntimeError("CUDA out of memory")
            return super().predict_single_npy_array(image, properties, *args)

    from kaapana_assets.segmentation.models import LoadedModel

    failing = LoadedModel("nnunet-liver-test", "4", Path("unused"), FailsSecond(truth), LABEL_NAMES)
    with pytest.raises(RuntimeError, match="out of memory"):
        segment_studies(targets, uids, failing)
    committed = lake.read(SEGMENTATIONS, pl.col("model_version") == "4")
    assert set(committed["study_uid"].to_list()) == {uids[0]}  # the one before the failure is kept
    reads: list[TableSpec] = []
    read = lake.read
    monkeypatch.setattr(lake, "read", lambda table, *args, **kwargs: reads.append(table) or read(table, *args, **kwargs))
    rerun = segment_studies(targets, uids, LoadedModel("nnunet-liver-test", "4", Path("unused"),
                                                             PhantomPredictor(truth), LABEL_NAMES))[0]
    assert [r.reused for r in rerun] == [True, False, False]
    # Three reads for the run's three studies (their series, the statistics already made, the
    # source slices), the one that recomputes series/studies for the commit, and the projects
    # of the SEG series and their sources.
    assert reads == [SERIES, SEGMENTATIONS, INSTANCES, INSTANCES, SERIES_PROJECTS]


def test_a_burst_reports_in_study_order_and_a_seg_that_cannot_be_archived_stops_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress hears of a burst's studies in their order, a skipped one between them
    counted; when a SEG cannot be archived (disk full) that error is raised, the studies
    before it are committed and nothing after it is archived."""
    from kaapana_assets.segmentation import segment
    from kaapana_assets.segmentation.segment import segment_studies

    targets, uids, truth = _ingested_burst(tmp_path, 4)
    lake = targets.lake

    seen: list[str] = []
    results, skipped = segment_studies(targets, [uids[0], "2.25.1", uids[1]], _model(truth),
                                       lambda done, total, r: seen.append(f"{done}/{total} {r.study_uid}"))
    assert [r.study_uid for r in results] == uids[:2] and list(skipped) == ["2.25.1"]
    assert seen == [f"1/3 {uids[0]}", f"3/3 {uids[1]}"]

    archived: list[str] = []
    archive_seg = segment.archive_seg

    def fails_second(archive: Any, seg: Any, data: bytes) -> dict[str, Any]:
        if archived:
            raise OSError(28, "No space left on device")
        archived.append(str(seg.StudyInstanceUID))
        return archive_seg(archive, seg, data)

    monkeypatch.setattr(segment, "archive_seg", fails_second)
    with pytest.raises(OSError, match="No space left"):
        segment_studies(targets, uids[2:], _model(truth, version="4"))
    assert archived == [uids[2]]  # the last study was predicted, but never archived
    committed = lake.read(SEGMENTATIONS, pl.col("model_version") == "4")
    assert set(committed["study_uid"].to_list()) == {uids[2]}
    assert lake.read(INSTANCES, pl.col("modality") == "SEG").height == 3

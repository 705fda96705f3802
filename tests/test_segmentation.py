"""Segmentation: new studies segmented with the production model, as DICOM SEG with statistics."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import highdicom as hd
import numpy as np
import polars as pl
import pytest
import torch

from kaapana_assets.ingest.assets import dicom_studies, quarantine
from kaapana_assets.lake import Lake
from kaapana_assets.segmentation.assets import segmentations
from kaapana_assets.synthetic import generate_site, get_profile
from kaapana_assets.synthetic.generator import phantom_for
from kaapana_assets.training import nnunet
from resources import MlflowResource
from sensors.incoming import incoming_studies
from tests.helpers import TRAIN_GRID

# slow tier (`make test-all`): a trained nnU-Net predicts (the session trained_site)
pytestmark = pytest.mark.slow

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


def test_new_study_is_segmented_as_valid_dicom_seg(trained_site) -> None:  # type: ignore[no-untyped-def]
    study = _new_study(trained_site, 0)
    result = _segment(trained_site, study)
    assert result.success, result.all_events
    md = result.asset_materializations_for_node("segmentations")[0].metadata
    assert md["model"].value == "nnunet-liver-train:v1"
    assert "data:image/png;base64," in md["overlay"].value
    lake = Lake(trained_site.home.lake)

    # The SEG is archived and indexed: a series row with modality SEG pointing at the CT.
    seg_series = lake.read("series", pl.col("series_uid") == md["seg_series_uid"].value).row(0, named=True)
    assert seg_series["modality"] == "SEG" and seg_series["referenced_series_uids"] == [study.series_uid]
    ct_series = lake.read("series", pl.col("series_uid") == study.series_uid).row(0, named=True)
    assert ct_series["reference_seg_series_uids"] == [md["seg_series_uid"].value]
    path = lake.read("instances", pl.col("sop_instance_uid") == md["seg_sop_instance_uid"].value)["archive_path"][0]
    seg_file = trained_site.home.archive / path

    seg = hd.seg.segread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
    labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert "liver" in labels
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("nnunet-liver-train", "1")
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True, timeout=60)
        assert [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")] == []

    # Statistics per label, in the segmentations table.
    stats = lake.read("segmentations", pl.col("study_uid") == study.study_uid)
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


def test_no_production_model_fails_with_a_reason(trained_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = _new_study(trained_site, 1)
    empty = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}", artifact_root=(tmp_path / "art").as_uri())
    result = _segment(trained_site, study, {**trained_site.resources, "mlflow": empty})
    failure = result.failure_data_for_node("segmentations")
    assert "holds the alias 'production'" in failure.error.message and "kaapana model import" in failure.error.message  # type: ignore[union-attr]


def test_model_import(trained_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.cli import main
    from kaapana_assets.training.tracking import PRODUCTION

    tracking = trained_site.tracking()
    folder = tracking.download(tracking.version_by_alias("nnunet-liver-train", PRODUCTION), tmp_path / "dl")
    # As if it came from elsewhere: a trainer class nnU-Net cannot look up on CPU-only torch.
    checkpoint_path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerNoMirroring"
    torch.save(checkpoint, checkpoint_path)
    assert main(["model", "import", str(folder), "--name", "imported-liver", "--promote",
                 "--home", str(trained_site.home.root)]) == 0
    version = tracking.version_by_alias("imported-liver", PRODUCTION)
    assert version.tags["kaapana.original_trainers"] == "nnUNetTrainerNoMirroring"
    loaded = nnunet.load_predictor(tracking.download(version, tmp_path / "again"), "cpu")
    assert loaded is not None
    (tmp_path / "not-a-model").mkdir()
    assert main(["model", "import", str(tmp_path / "not-a-model"), "--name", "x", "--home", str(trained_site.home.root)]) == 2


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
    ingest = defs.resolve_job_def("ingest_study").execute_in_process(
        run_config=requests[0].run_config, partition_key=study.study_uid, instance=instance)
    assert ingest.success

    evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    requested = evaluation.get_requested_partitions(dg.AssetKey("segmentations"))
    assert study.study_uid in requested
    run = dg.materialize([segmentations], partition_key=study.study_uid, instance=instance, resources=resources)
    assert run.success
    again = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=evaluation.cursor)
    assert study.study_uid not in again.get_requested_partitions(dg.AssetKey("segmentations"))


def test_model_promotion_requests_resegmentation(trained_site) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.training.tracking import PRODUCTION
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
    current = tracking.version_by_alias("nnunet-liver-train", PRODUCTION)
    newest = int(tracking.register(current.run_id, "model", "nnunet-liver-train", tags={"kaapana.validation": "passed"}).version)
    tracking.promote("nnunet-liver-train", newest)
    try:
        moved = tick(first.cursor)
        segmented = set(Lake(trained_site.home.lake).read("segmentations")["study_uid"].to_list())
        requested = {r.partition_key for r in moved.run_requests}
        assert segmented <= requested and moved.cursor == f"nnunet-liver-train:{newest}"
        assert all(r.run_key.startswith(f"nnunet-liver-train:{newest}:") for r in moved.run_requests)
    finally:
        tracking.promote("nnunet-liver-train", 1)


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
        syntaxes = lake.read("instances", pl.col("series_uid") == study.series_uid)["transfer_syntax_uid"].unique()
        assert syntaxes.to_list() == [{"jpeg_lossless_sv1": "1.2.840.10008.1.2.4.70",
                                       "jpeg2000_lossless": "1.2.840.10008.1.2.4.90"}[encoding]]
        md = result.asset_materializations_for_node("segmentations")[0].metadata
        path = lake.read("instances", pl.col("sop_instance_uid") == md["seg_sop_instance_uid"].value)["archive_path"][0]
        liver = lake.read("segmentations", (pl.col("study_uid") == study.study_uid) & (pl.col("label") == "liver"))
        assert liver["voxel_count"][0] > 0
        if shutil.which("dciodvfy"):
            out = subprocess.run(["dciodvfy", str(trained_site.home.archive / path)], capture_output=True, text=True,
                                 timeout=60)
            assert [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")] == []

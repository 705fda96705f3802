"""Training: a tiny nnU-Net from a cohort, through Dagster, tracked and registered in a real MLflow store."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import torch

from bench.training_site import TRAIN_GRID
from kaapana_assets import nnunet
from kaapana_assets.ingest.volume import assemble_volume
from kaapana_assets.nnunet import Schedule, SchedulePreset, patient_split, with_width
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.synthetic import get_profile
from kaapana_assets.synthetic.generator import phantom_for

# slow tier (`make test-all`): trains nnU-Net (the session trained_site)
pytestmark = pytest.mark.slow


def test_schedules_and_split() -> None:
    assert Schedule.preset("full").epochs == 1000
    short = Schedule.preset("short", epochs=3)
    assert short.epochs == 3 and short.optimizer == "adamw"
    assert Schedule.preset(SchedulePreset.SHORT, epochs=3) == short  # config strings are the presets' values
    with pytest.raises(ValueError, match=r"one of \['full', 'short', 'tiny'\]"):
        Schedule.preset("long")
    split = patient_split([("c0", "p0"), ("c1", "p0"), ("c2", "p1"), ("c3", "p2"), ("c4", "p3"), ("c5", "p4")])
    val_patients = {p for c, p in [("c0", "p0"), ("c1", "p0")] if c in split["val"]}
    assert not (set(split["train"]) & set(split["val"])) and len(split["val"]) >= 1
    assert val_patients in (set(), {"p0"}) and ("c0" in split["val"]) == ("c1" in split["val"])  # a patient stays together
    plans = {"configurations": {"3d_fullres": {"architecture": {"arch_kwargs": {"features_per_stage": [32, 64, 128, 256, 320]}}}}}
    assert with_width(plans, 16)["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 256]


def test_tiny_training_end_to_end(trained_site) -> None:  # type: ignore[no-untyped-def]
    result = trained_site.result
    assert result.success
    dataset = result.asset_materializations_for_node("nnunet_dataset")[0].metadata
    assert dataset["cases"].value == 6 and dataset["labels"].value["liver"] == 1
    md = result.asset_materializations_for_node("trained_model")[0].metadata
    model_name, version = md["model_name"].value, md["model_version"].value
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "validation_dice"]
    assert check.passed

    tracking = trained_site.tracking()
    client = tracking.client()
    run = client.get_run(md["mlflow_run_id"].value)
    assert run.data.params["cohort"] == "liver-train" and run.data.params["schedule.epochs"] == "4"
    assert "kaapana_assets" in run.data.params and run.data.params["cohort_version"] == "1"
    assert int(run.data.params["delta_version.series"]) >= 1  # the exact series table version the cohort read
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4  # one per epoch
    assert run.data.metrics["val_dice_liver"] >= 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/plans.json", "model/dataset.json", "model/fold_0"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "dataset")} >= {
        "dataset/nnUNetPlans.json", "dataset/dataset_fingerprint.json"}

    production = find_version(tracking, model_name)
    assert production is not None and int(production.version) == version
    assert production.tags["kaapana.validation"] == "passed"

    # The registered version, loaded back from MLflow, predicts.
    folder = tracking.download(production)
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    predictor = nnunet.load_predictor(folder, "cpu")
    study = trained_site.studies[0]
    volume = assemble_volume(study.ct_files)
    prediction = nnunet.predict(predictor, volume.hu, volume.spacing_zyx)
    truth = phantom_for(get_profile("site-a").resized(**TRAIN_GRID), 21, study.index).labels
    organ = (truth > 0).astype(np.uint8)
    model_dice = nnunet.dice((prediction > 0).astype(np.uint8), organ, 1)
    body = (volume.hu > -500).astype(np.uint8)  # trivial baseline: "the whole body is liver"
    baseline = nnunet.dice(body, organ, 1)
    assert prediction.shape == volume.hu.shape
    assert model_dice > baseline, (model_dice, baseline)
    # Our loader (no trainer class lookup) and nnU-Net's own build the same predictor.
    reference = nnunet.load_predictor(folder, "cpu", via_trainer=True)
    assert type(predictor.network) is type(reference.network)
    ours, theirs = predictor.network.state_dict(), reference.network.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for attribute in ("trainer_name", "allowed_mirroring_axes", "dataset_json"):
        assert getattr(predictor, attribute) == getattr(reference, attribute), attribute
    assert predictor.configuration_manager.configuration == reference.configuration_manager.configuration
    assert all(torch.equal(a[k], b[k]) for a, b in zip(predictor.list_of_parameters, reference.list_of_parameters, strict=True)
               for k in a)
    assert np.array_equal(nnunet.predict(reference, volume.hu, volume.spacing_zyx), prediction)


def test_failed_validation_blocks_promotion(trained_site) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.training.assets import production_model, trained_model
    from resources import NnunetResource

    tracking = trained_site.tracking()
    before = find_version(tracking, "nnunet-liver-train")
    strict = {**trained_site.resources, "nnunet_settings": NnunetResource(
        workdir=str(trained_site.home.root / "nnunet"), device="cpu", schedule="tiny", epochs=1, promotion_dice=0.999)}
    result = dg.materialize([trained_model, production_model], partition_key="liver-train",
                            instance=trained_site.instance, resources=strict, raise_on_error=False)
    [check] = result.get_asset_check_evaluations()
    assert not check.passed and "threshold 0.999" in (check.description or "")
    assert not result.asset_materializations_for_node("production_model")  # blocked
    new_version = result.asset_materializations_for_node("trained_model")[0].metadata["model_version"].value
    assert str(find_version(tracking, "nnunet-liver-train").version) == str(before.version)
    assert tracking.client().get_model_version("nnunet-liver-train", str(new_version)).tags["kaapana.validation"] == "failed"

    # Materializing production_model alone still refuses the failed version...
    alone = dg.materialize([production_model], partition_key="liver-train", instance=trained_site.instance,
                           resources=strict, raise_on_error=False, selection=[production_model])
    assert not alone.success
    # ...but a person may promote it explicitly.
    from kaapana_assets.cli import main

    assert main(["model", "promote", "nnunet-liver-train", str(new_version), "--home", str(trained_site.home.root)]) == 0
    assert str(find_version(tracking, "nnunet-liver-train").version) == str(new_version)
    assert main(["model", "promote", "nnunet-liver-train", "99", "--home", str(trained_site.home.root)]) == 2
    tracking.promote("nnunet-liver-train", before.version)  # leave the session's model as it was


def test_dataset_needs_a_train_cohort(trained_site, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kaapana_assets.training.assets import nnunet_dataset
    from resources import CohortDefinitionsResource

    (tmp_path / "liver-train.yaml").write_text("name: liver-train\npurpose: test\n")
    resources = {**trained_site.resources, "cohort_definitions": CohortDefinitionsResource(folder=str(tmp_path))}
    result = dg.materialize([nnunet_dataset], partition_key="liver-train", instance=trained_site.instance,
                            resources=resources, raise_on_error=False)
    assert "nnU-Net datasets are made from train cohorts" in result.failure_data_for_node("nnunet_dataset").error.message

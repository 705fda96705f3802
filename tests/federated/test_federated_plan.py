"""Fingerprint aggregation across sites, checked against exact pooled statistics, and one
nnU-Net plan made at the hub from aggregates alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kaapana_assets import nnunet
from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.definitions import CohortDefinition
from kaapana_assets.cohorts.membership import snapshot_cohort
from kaapana_assets.federated.fingerprint import (
    FederationError,
    aggregate_fingerprints,
    plan_at_hub,
    site_fingerprint,
)
from kaapana_assets.federated.strategy import Strategy
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.training.export import export_cohort

COHORT = CohortDefinition.model_validate({"name": "liver-train", "purpose": "train", "required_labels": ["liver"],
                                          "filter": {"modality": "CT", "has_reference_segmentation": True}})


@pytest.fixture(scope="module")
def site_datasets(tmp_path_factory: pytest.TempPathFactory, corpus: dict) -> dict[str, Path]:
    """Each site exports its own cohort at its own home (two scanners: non-IID)."""
    root = tmp_path_factory.mktemp("fedplan")
    out = {}
    for site, studies in corpus.items():
        home = KaapanaHome(root / site)
        targets = Archive.for_home(home)
        ingest_files([f for s in studies for f in s.files], targets, remove_sources=False)
        snapshot = snapshot_cohort(targets.lake, COHORT)
        folder = root / site / "nnunet" / "raw" / "Dataset001_LiverTrain"
        export_cohort(targets.lake, targets.root, snapshot, folder, ["liver"])
        out[site] = folder
    return out


def _pooled_foreground(folders: list[Path]) -> np.ndarray:
    values = []
    for folder in folders:
        for image in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
            label = folder / "labelsTr" / image.name.replace("_0000", "")
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0
            values.append(array[mask].astype(np.float64))
    return np.concatenate(values)


def test_aggregate_equals_pooled_statistics(site_datasets: dict[str, Path]) -> None:
    fingerprints = [site_fingerprint(folder, site) for site, folder in site_datasets.items()]
    # Only aggregates travel: the summary is small and holds no voxel values.
    assert all(len(f.to_json()) < 200_000 for f in fingerprints)
    combined = aggregate_fingerprints(fingerprints)
    pooled = _pooled_foreground(list(site_datasets.values()))
    stats = combined["foreground_intensity_properties_per_channel"]["0"]
    assert stats["mean"] == pytest.approx(pooled.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(pooled.std(), rel=1e-6)
    assert (stats["min"], stats["max"]) == (pooled.min(), pooled.max())
    for key, q in (("median", 50), ("percentile_00_5", 0.5), ("percentile_99_5", 99.5)):
        assert abs(stats[key] - np.percentile(pooled, q)) <= 1.0, key  # exact to the 1-HU bin
    assert len(combined["spacings"]) == sum(f.cases for f in fingerprints)
    assert len({tuple(s) for s in combined["spacings"]}) == 2  # both scanners' geometry is in the plan


def test_one_plan_at_the_hub_without_images(site_datasets: dict[str, Path], tmp_path: Path) -> None:
    fingerprints = [site_fingerprint(folder, site) for site, folder in site_datasets.items()]
    paths = nnunet.NnunetPaths(tmp_path / "hub")
    with nnunet.nnunet_environment(paths):
        plans = plan_at_hub(aggregate_fingerprints(fingerprints), fingerprints,
                            paths.raw / "Dataset900_Federated", paths.preprocessed / "Dataset900_Federated", 900)
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["CTNormalization"]
    assert plans["foreground_intensity_properties_per_channel"]["0"]["mean"] == pytest.approx(
        aggregate_fingerprints(fingerprints)["foreground_intensity_properties_per_channel"]["0"]["mean"])
    assert not list(paths.raw.rglob("*.nii.gz"))  # the hub never held an image


def test_sites_must_agree_on_labels(site_datasets: dict[str, Path]) -> None:
    a, b = (site_fingerprint(folder, site) for site, folder in site_datasets.items())
    b.labels = {"background": 0, "kidney": 1}
    with pytest.raises(FederationError, match="labels of"):
        aggregate_fingerprints([a, b])


@pytest.mark.slow  # trains nnU-Net
def test_one_local_fedavg_round(site_datasets: dict[str, Path], tmp_path: Path) -> None:
    """Hub plan → shared initial network → each site trains from it on its own data →
    signed Flower messages → Flower's FedAvg → a global model that loads and predicts."""
    import torch
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from kaapana_assets.federated.aggregation import aggregate, require_quorum
    from kaapana_assets.federated.site import local_update, prepare_site
    from kaapana_assets.federation.channel import (
        ARRAYS,
        METRICS,
        Kind,
        from_arrays,
        metrics_record,
        seal,
        to_arrays,
        verify,
    )
    from kaapana_assets.federation.keys import generate_site_key

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # type: ignore[misc]  # a Message needs a run

    fingerprints = [site_fingerprint(folder, site) for site, folder in site_datasets.items()]
    hub = nnunet.NnunetPaths(tmp_path / "hub")
    fingerprint = aggregate_fingerprints(fingerprints)
    with nnunet.nnunet_environment(hub):
        plans = plan_at_hub(fingerprint, fingerprints,
                            hub.raw / "Dataset900_Federated", hub.preprocessed / "Dataset900_Federated", 900)
    plans = nnunet.with_width(plans, 8)
    dataset_json = json.loads(next(iter(site_datasets.values())).joinpath("dataset.json").read_text())
    start = nnunet.initial_network_weights(plans, dataset_json, seed=7)
    keys = {site: generate_site_key() for site in site_datasets}
    schedule = nnunet.Schedule.preset(nnunet.SchedulePreset.TINY, epochs=1, iterations_per_epoch=3)
    updates = []
    for site, raw in site_datasets.items():
        paths = nnunet.NnunetPaths(raw.parents[2] / "nnunet")  # the site's own nnU-Net folders
        prepare_site(paths, raw, 1, plans, fingerprint)
        update = local_update(site, paths, raw, 1, start, schedule, "cpu", 2)
        content = seal(RecordDict({ARRAYS: to_arrays(update.weights), METRICS: metrics_record(update.cases, {})}),
                       Kind.UPDATE, "exp", 1, site, update.cases, keys[site])
        verify(content, keys[site], Kind.UPDATE, "exp", 1, site)
        updates.append((update.cases, from_arrays(content[ARRAYS]), Message(content, 1, "train")))
    require_quorum(list(site_datasets), list(site_datasets), min_sites=2)
    merged = aggregate([m for _, _, m in updates], 1, Strategy.FEDAVG, reference=start)
    key = next(k for k, v in start.items() if v.is_floating_point() and v.numel() > 10)
    assert not torch.equal(updates[0][1][key], start[key])  # the sites trained
    total = sum(cases for cases, _, _ in updates)
    expected = torch.stack([weights[key].double() * cases / total for cases, weights, _ in updates]).sum(0)
    assert torch.allclose(merged[key].double(), expected, atol=1e-5)  # Flower accumulates in float32
    folder = nnunet.model_folder_from_weights(tmp_path / "global", plans, dataset_json, merged)
    predictor = nnunet.load_predictor(folder, "cpu")
    image = next((next(iter(site_datasets.values())) / "imagesTr").glob("*_0000.nii.gz"))
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    spacing = tuple(reversed(sitk.ReadImage(str(image)).GetSpacing()))
    assert nnunet.predict(predictor, array, spacing).shape == array.shape  # type: ignore[arg-type]


# slow: two real nnU-Net trainings (≈10 s)
@pytest.mark.slow
def test_seeded_local_training_is_reproducible(site_datasets: dict[str, Path], tmp_path: Path) -> None:
    """The same seed trains the same network (a rerun of a round, the quality benchmark's two
    runs); another seed another one; every site and round gets its own seed."""
    import dataclasses

    import torch

    from kaapana_assets.federated.site import local_update, prepare_site, training_seed

    fingerprints = [site_fingerprint(folder, site) for site, folder in site_datasets.items()]
    fingerprint = aggregate_fingerprints(fingerprints)
    hub = nnunet.NnunetPaths(tmp_path / "hub")
    with nnunet.nnunet_environment(hub):
        plans = nnunet.with_width(plan_at_hub(fingerprint, fingerprints, hub.raw / "Dataset901_Federated",
                                              hub.preprocessed / "Dataset901_Federated", 901), 8)
    site, raw = next(iter(site_datasets.items()))
    dataset_json = json.loads(raw.joinpath("dataset.json").read_text())
    start = nnunet.initial_network_weights(plans, dataset_json, seed=3)
    paths = nnunet.NnunetPaths(raw.parents[2] / "nnunet")  # the site's own nnU-Net folders
    prepare_site(paths, raw, 1, plans, fingerprint)
    schedule = nnunet.Schedule.preset(nnunet.SchedulePreset.TINY, epochs=1, iterations_per_epoch=2)

    def weights(seed: int) -> dict:
        return local_update(site, paths, raw, 1, start, dataclasses.replace(schedule, seed=seed), "cpu", 1).weights

    first, again, other = weights(11), weights(11), weights(12)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
    seeds = {training_seed(0, r, s) for r in (1, 2) for s in ("site-a", "site-b")}
    assert len(seeds) == 4 and training_seed(0, 1, "site-a") == training_seed(0, 1, "site-a")
    assert training_seed(1, 1, "site-a") != training_seed(0, 1, "site-a")

"""The site side of a federated round, local transport: preprocess with the hub's plans,
train from the global weights on the site's own data, return an update (weights, case
count, metrics). Nothing else leaves: see payload.py and guard.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kaapana_assets.federated.payload import SiteUpdate
from kaapana_assets.training import nnunet


def prepare_site(paths: nnunet.NnunetPaths, raw_dataset: Path, dataset_id: int, plans: dict, fingerprint: dict,
                 processes: int = 1) -> None:
    """Preprocess the site's dataset with the common plans (renamed for its dataset) and
    the global fingerprint they were made from."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    folder = paths.preprocessed / raw_dataset.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{nnunet.PLANS}.json").write_text(json.dumps({**plans, "dataset_name": raw_dataset.name}, indent=2))
    (folder / "dataset.json").write_text((raw_dataset / "dataset.json").read_text())
    (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))
    with nnunet.nnunet_environment(paths, threads=processes):
        preprocess_dataset(dataset_id, nnunet.PLANS, configurations=(nnunet.CONFIGURATION,),
                           num_processes=[processes], verbose=False, show_progress_bar=False)


def local_update(site: str, paths: nnunet.NnunetPaths, raw_dataset: Path, dataset_id: int, global_weights: dict,
                 schedule: nnunet.Schedule, device: str = "cpu", threads: int = 2) -> SiteUpdate:
    """Train from the global weights on the site's training split."""
    # The hub's plans fix the network; a site must not change its width.
    schedule = dataclasses.replace(schedule, base_features=None)
    cases = json.loads((raw_dataset / "cases.json").read_text())
    split = nnunet.patient_split([(c["case"], c["patient_id"]) for c in cases])
    with nnunet.nnunet_environment(paths, threads=threads, training=True):
        result = nnunet.train(dataset_id, schedule, split, device, threads, initial_weights=global_weights)
    checkpoint = torch.load(result.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    last = result.epochs[-1] if result.epochs else {}
    metrics = {k: float(last[k]) for k in ("train_loss", "val_loss", "pseudo_dice") if k in last and last[k] == last[k]}
    return SiteUpdate(site, len(split["train"]), checkpoint["network_weights"], metrics)

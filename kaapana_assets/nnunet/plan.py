"""Fingerprint, plan and preprocess a raw dataset; plans at another network width."""

from __future__ import annotations

import json

from kaapana_assets.nnunet.paths import CONFIGURATION, NnunetPaths, nnunet_environment


def plan_and_preprocess(paths: NnunetPaths, dataset_id: int, processes: int = 1) -> tuple[dict, dict]:
    """Fingerprint, plan and preprocess (3d_fullres) the raw dataset `dataset_id` under `paths`
    through nnunetv2's Python API. The integrity check is skipped: images and labels are
    written from one geometry by construction. Returns (fingerprint, plans)."""
    with nnunet_environment(paths, threads=processes):
        # Imported with nnU-Net's environment set: nnunetv2 reads some of it at import.
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
            preprocess_dataset,
        )
        from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

        fingerprint = extract_fingerprint_dataset(
            dataset_id, num_processes=processes, check_dataset_integrity=False, clean=True, verbose=False,
            show_progress_bar=False,
        )
        _, plans_identifier = plan_experiment_dataset(dataset_id)
        preprocess_dataset(dataset_id, plans_identifier, configurations=(CONFIGURATION,), num_processes=[processes],
                           verbose=False, show_progress_bar=False)
        folder = paths.preprocessed / convert_id_to_dataset_name(dataset_id)
    plans = json.loads((folder / f"{plans_identifier}.json").read_text())
    return fingerprint, plans


def with_width(plans: dict, base_features: int | None) -> dict:
    """Plans whose network has `base_features` in the first stage, doubling per stage."""
    plans = json.loads(json.dumps(plans))
    if base_features:
        arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
        stages = len(arch["features_per_stage"])
        arch["features_per_stage"] = [min(base_features * 2**i, 320) for i in range(stages)]
    return plans

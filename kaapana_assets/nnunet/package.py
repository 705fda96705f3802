"""Self-contained, predictor-ready nnU-Net model folders: dataset.json, plans.json and
fold_*/checkpoint_final.pth whose trainer_name is nnUNetTrainer (see the package doc)."""

from __future__ import annotations

import json
from pathlib import Path

from kaapana_assets.nnunet.paths import CONFIGURATION, FOLD
from kaapana_assets.nnunet.trainer import TrainingResult


def package_model(result: TrainingResult, target: Path) -> Path:
    """A self-contained nnU-Net model folder: dataset.json, plans.json and
    fold_0/checkpoint_final.pth whose trainer_name is nnUNetTrainer (see the package doc)."""
    import torch

    target.mkdir(parents=True, exist_ok=True)
    (target / "dataset.json").write_text(json.dumps(result.dataset_json, indent=2))
    (target / "plans.json").write_text(json.dumps(result.plans, indent=2))
    fold = target / f"fold_{FOLD}"
    fold.mkdir(exist_ok=True)
    checkpoint = torch.load(result.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    checkpoint["optimizer_state"] = None  # not needed to predict; large
    torch.save(checkpoint, fold / "checkpoint_final.pth")
    return target


def model_folder_from_weights(target: Path, plans: dict, dataset_json: dict, weights: dict) -> Path:
    """A predictor-ready folder for weights that no single trainer produced (a federated
    global model): fold_all/checkpoint_final.pth with trainer_name nnUNetTrainer."""
    import torch

    target.mkdir(parents=True, exist_ok=True)
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (target / "plans.json").write_text(json.dumps(plans, indent=2))
    (target / "fold_all").mkdir(exist_ok=True)
    torch.save({
        "network_weights": weights, "optimizer_state": None, "grad_scaler_state": None, "current_epoch": 0,
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), "_best_ema": None,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": "all", "dataset_json": dataset_json,
                      "device": "cpu"},
    }, target / "fold_all" / "checkpoint_final.pth")
    return target

"""Prediction with a packaged model folder, in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaapana_assets.nnunet.device import Device, device_for


def load_predictor(model_folder: Path, device: Device | str = Device.AUTO, mirroring: bool = False,
                   via_trainer: bool = False):
    """An nnUNetPredictor for a packaged model folder (any fold_* present).

    nnU-Net's own loader (`initialize_from_trained_model_folder`) looks the checkpoint's
    trainer class up to build the network, which imports nnUNetTrainer and with it seaborn,
    matplotlib and scipy.stats: 1.1 s of a 1.4 s load in every fresh run process. For the
    plain `nnUNetTrainer` (ours, and most published models), whose network is
    `get_network_from_plans` of the plans, the same network is built directly and handed to
    the predictor through its public `manual_initialization` (a test holds both loaders
    equal); any other trainer, or `via_trainer`, goes through nnU-Net's loader."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folds = tuple(
        int(p.name.split("_", 1)[1]) if p.name.split("_", 1)[1].isdigit() else p.name.split("_", 1)[1]
        for p in sorted(model_folder.glob("fold_*"))
    )
    if not folds:
        raise FileNotFoundError(f"{model_folder} has no fold_* folder with checkpoint_final.pth")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=device_for(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    def checkpoint(fold: int | str) -> dict:
        return torch.load(model_folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)

    first = None if via_trainer else checkpoint(folds[0])
    if first is None or first["trainer_name"] != "nnUNetTrainer":
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=folds,
                                                       checkpoint_name="checkpoint_final.pth")
        return predictor
    checkpoints = [first, *(checkpoint(fold) for fold in folds[1:])]
    dataset_json = load_json(str(model_folder / "dataset.json"))
    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    configuration = plans_manager.get_configuration(first["init_args"]["configuration"])
    network = get_network_from_plans(
        configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=True, deep_supervision=False,
    )
    parameters = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(network, plans_manager, configuration, parameters, dataset_json,
                                    first["trainer_name"], first.get("inference_allowed_mirroring_axes"))
    return predictor


def predict(predictor, hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Label volume (z, y, x) for a HU volume, in-process."""
    labels = predictor.predict_single_npy_array(
        hu[None].astype(np.float32), {"spacing": list(spacing_zyx)}, None, None, False
    )
    return np.asarray(labels, dtype=np.uint8)

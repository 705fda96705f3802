"""nnU-Net v2 through its Python APIs, in-process (a process start costs 6–7 s of imports).

Two traps shape this module (see shared FIELD_NOTES):
- On CPU-only torch, nnU-Net's lookup of a trainer class *by name* walks into modules that
  import torchvision and crash. So our trainer is instantiated directly, and packaged
  checkpoints say `trainer_name='nnUNetTrainer'` so predictors never look ours up.
- Tiny budgets need AdamW (SGD at lr 1e-2 leaves the organ at Dice 0 after 40 iterations).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kaapana_assets.environment import unchanged_environment

CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
FOLD = 0


@dataclass(frozen=True)
class Schedule:
    """How long and how wide to train. `full` is nnU-Net's own schedule."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    base_features: int | None = None  # None: nnU-Net's width (32 doubling to 320)
    optimizer: str = "sgd"  # "sgd" (nnU-Net's) or "adamw" (converges within tiny budgets)
    learning_rate: float = 1e-2
    # FedProx (Li et al. 2020): mu/2 · ||w - w_global||² added to the training loss, so that
    # sites with very different data do not drift far from the global model. 0: plain FedAvg.
    proximal_mu: float = 0.0
    # Seeds Python's, NumPy's and torch's generators before the trainer is built: on the CPU,
    # with fixed threads and in-process augmentation, the same seed gives the same network.
    # None: nnU-Net's own behaviour (unseeded).
    seed: int | None = None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Schedule":
        presets = {
            "full": cls(),
            # Demo: minutes on 2 CPU cores, Dice ≈ 0.8 on the phantom liver.
            "short": cls(epochs=6, iterations_per_epoch=10, val_iterations=2, base_features=16,
                         optimizer="adamw", learning_rate=3e-3),
            # Tests: ~15 s on 2 cores; 32 AdamW iterations reliably beat a trivial baseline
            # (12 iterations at width 8 did not, one run in three).
            "tiny": cls(epochs=4, iterations_per_epoch=8, val_iterations=1, base_features=16,
                        optimizer="adamw", learning_rate=3e-3),
        }
        if name not in presets:
            raise ValueError(f"unknown schedule {name!r}; one of {sorted(presets)}")
        return cls(**{**asdict(presets[name]), **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class NnunetPaths:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "results"


@contextmanager
def nnunet_environment(paths: NnunetPaths, threads: int | None = None, training: bool = False) -> Iterator[NnunetPaths]:
    """nnU-Net reads its folders from the environment (lazily, in 2.8): set them for the
    duration of the block, and restore what was there."""
    values = {
        "nnUNet_raw": str(paths.raw),
        "nnUNet_preprocessed": str(paths.preprocessed),
        "nnUNet_results": str(paths.results),
        "nnUNet_def_n_proc": str(threads or 1),
    }
    if training:
        # Augmentation in-process: on 2 cores, worker processes were slower. Planning must
        # not see it (torch.set_num_threads(0) crashes there).
        values["nnUNet_n_proc_DA"] = "0"
    for folder in (paths.raw, paths.preprocessed, paths.results):
        folder.mkdir(parents=True, exist_ok=True)
    with unchanged_environment(*values):
        os.environ.update(values)
        yield paths


def dataset_id_for(name: str) -> int:
    """A stable nnU-Net dataset id (1–999) for a cohort name."""
    return 1 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 999


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{re.sub(r'[^A-Za-z0-9]+', '', name.title()) or 'Cohort'}"


@dataclass
class Case:
    name: str  # nnU-Net case identifier
    image: Any  # SimpleITK image (HU)
    label: Any  # SimpleITK image (label ids)
    patient_id: str


def write_raw_dataset(folder: Path, cases: list[Case], labels: Mapping[str, int], description: str = "") -> dict:
    """nnU-Net's raw format: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    import SimpleITK as sitk

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in cases:
        sitk.WriteImage(case.image, str(folder / "imagesTr" / f"{case.name}_0000.nii.gz"))
        sitk.WriteImage(case.label, str(folder / "labelsTr" / f"{case.name}.nii.gz"))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{k: int(v) for k, v in labels.items() if v}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "description": description,
        # Explicit file lists: without them nnU-Net lists files with a fork()ed Pool of 12,
        # which deadlocks in a process that has threads (a Dagster run, torch) — seen here.
        "dataset": {case.name: {"images": [f"imagesTr/{case.name}_0000.nii.gz"], "label": f"labelsTr/{case.name}.nii.gz"}
                    for case in cases},
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return dataset


def plan_and_preprocess(dataset_id: int, processes: int = 1) -> tuple[dict, dict]:
    """Fingerprint, plan and preprocess (3d_fullres) through nnunetv2's Python API. The
    integrity check is skipped: images and labels are written from one geometry by construction.
    Call inside nnunet_environment. Returns (fingerprint, plans)."""
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
    folder = Path(os.environ["nnUNet_preprocessed"]) / convert_id_to_dataset_name(dataset_id)
    plans = json.loads((folder / f"{plans_identifier}.json").read_text())
    return fingerprint, plans


class TooFewPatients(ValueError):
    """Fewer than two patients: no validation case that is not also a training case."""


def require_patients(patients: set[str], what: str, minimum: int = 2) -> None:
    """TooFewPatients unless `patients` holds at least `minimum` distinct ids."""
    if len(patients) < minimum:
        shown = ", ".join(sorted(patients)[:5]) or "none"
        raise TooFewPatients(
            f"{what} has {len(patients)} patient(s) ({shown}); training needs at least {minimum}: the validation "
            f"Dice that gates promotion must come from patients the model did not train on")


def patient_split(cases: list[tuple[str, str]], val_fraction: float = 0.2) -> dict[str, list[str]]:
    """Train/validation split by patient (no patient on both sides), deterministic: patients in
    the order of their id's hash, the first round(fraction × patients) of them (at least one,
    never all) for validation. `cases` are (case name, patient id); fewer than two patients is
    TooFewPatients."""
    patients = sorted({p for _, p in cases}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    require_patients(set(patients), f"a dataset of {len(cases)} case(s)")
    n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
    val_patients = set(patients[:n_val])
    return {
        "train": sorted(c for c, p in cases if p not in val_patients),
        "val": sorted(c for c, p in cases if p in val_patients),
    }


def with_width(plans: dict, base_features: int | None) -> dict:
    """Plans whose network has `base_features` in the first stage, doubling per stage."""
    plans = json.loads(json.dumps(plans))
    if base_features:
        arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
        stages = len(arch["features_per_stage"])
        arch["features_per_stage"] = [min(base_features * 2**i, 320) for i in range(stages)]
    return plans


EpochCallback = Callable[[int, dict[str, float]], None]


def _trainer_class():
    import torch
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class KaapanaTrainer(nnUNetTrainer):
        """nnUNetTrainer with a configurable schedule, optimizer and an epoch callback.
        Instantiated directly by our code, never looked up by name."""

        def apply(self, schedule: Schedule, on_epoch: EpochCallback | None,
                  initial_weights: dict | None = None) -> None:
            self.initial_weights = initial_weights
            self.num_epochs = schedule.epochs
            self.num_iterations_per_epoch = schedule.iterations_per_epoch
            self.num_val_iterations_per_epoch = schedule.val_iterations
            self.initial_lr = schedule.learning_rate
            self.kaapana_optimizer = schedule.optimizer
            self.on_epoch = on_epoch
            self.save_every = max(self.num_epochs, 1)  # only the final checkpoint matters here
            self.proximal_mu = schedule.proximal_mu

        def on_train_start(self) -> None:
            super().on_train_start()  # builds the network
            if getattr(self, "initial_weights", None) is not None:
                # Every site starts from the same global network: the full state dict,
                # segmentation layers included (load_pretrained_weights would skip them).
                network = self.network.module if self.is_ddp else self.network
                getattr(network, "_orig_mod", network).load_state_dict(self.initial_weights)
                if getattr(self, "proximal_mu", 0.0) > 0:
                    self.loss = _Proximal(self.loss, network, self.proximal_mu)  # type: ignore[has-type]

        def configure_optimizers(self):
            if getattr(self, "kaapana_optimizer", "sgd") != "adamw":
                return super().configure_optimizers()
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

        def on_epoch_end(self) -> None:
            epoch = self.current_epoch
            value = self.logger.get_value
            metrics = {
                "train_loss": float(value("train_losses", step=-1)),
                "val_loss": float(value("val_losses", step=-1)),
                "pseudo_dice": float(value("mean_fg_dice", step=-1)),
                "ema_pseudo_dice": float(value("ema_fg_dice", step=-1)),
                "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
                "epoch_seconds": float(time.time() - value("epoch_start_timestamps", step=-1)),
            }
            super().on_epoch_end()
            if self.on_epoch:
                self.on_epoch(epoch, metrics)

    return KaapanaTrainer


def _proximal_class():
    import torch

    class Proximal(torch.nn.Module):
        """The training loss plus FedProx's proximal term towards the weights training
        started from; validation (network in eval mode) sees the plain loss."""

        def __init__(self, loss, network, mu: float) -> None:
            super().__init__()
            self.inner, self.network, self.mu = loss, [network], mu  # a list: not a submodule
            self.anchor = [p.detach().clone() for p in network.parameters()]

        def forward(self, output, target):
            loss = self.inner(output, target)
            network = self.network[0]
            if not network.training:
                return loss
            drift = sum(((p - a) ** 2).sum() for p, a in zip(network.parameters(), self.anchor, strict=True))
            return loss + self.mu / 2 * drift

    return Proximal


def _Proximal(loss, network, mu: float):  # noqa: N802 - reads as the class
    return _proximal_class()(loss, network, mu)


def device_for(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class TrainingResult:
    output_folder: Path
    plans: dict
    dataset_json: dict
    split: dict[str, list[str]]
    epochs: list[dict[str, float]] = field(default_factory=list)


def seed_generators(seed: int) -> None:
    """Seed every generator nnU-Net's training draws from (weight init, patch sampling,
    augmentation): Python's `random`, NumPy's global one and torch's."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    dataset_id: int,
    schedule: Schedule,
    split: dict[str, list[str]],
    device: str = "auto",
    threads: int | None = None,
    on_epoch: EpochCallback | None = None,
    initial_weights: dict | None = None,
) -> TrainingResult:
    """Train fold 0 on `split` (from `initial_weights` when given: a federated round).
    Call inside nnunet_environment(training=True)."""
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    if threads:
        torch.set_num_threads(threads)
    if schedule.seed is not None:
        seed_generators(schedule.seed)
    name = convert_id_to_dataset_name(dataset_id)
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    (folder / "splits_final.json").write_text(json.dumps([split]))
    plans = with_width(json.loads((folder / f"{PLANS}.json").read_text()), schedule.base_features)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    epochs: list[dict[str, float]] = []

    def record(epoch: int, metrics: dict[str, float]) -> None:
        epochs.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics)

    trainer = _trainer_class()(plans={**plans, "continue_training": False}, configuration=CONFIGURATION,
                               fold=FOLD, dataset_json=dataset_json, device=device_for(device))
    trainer.apply(schedule, record, initial_weights)
    trainer.run_training()
    return TrainingResult(Path(trainer.output_folder), plans, dataset_json, split, epochs)


def package_model(result: TrainingResult, target: Path) -> Path:
    """A self-contained nnU-Net model folder: dataset.json, plans.json and
    fold_0/checkpoint_final.pth whose trainer_name is nnUNetTrainer (see module doc)."""
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


def load_predictor(model_folder: Path, device: str = "auto", mirroring: bool = False, via_trainer: bool = False):
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


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = prediction == label, truth == label
    total = int(p.sum() + t.sum())
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(p, t).sum()) / total


def evaluate(predictor, raw_folder: Path, cases: list[str], labels: Mapping[str, int]) -> dict[str, float]:
    """Mean Dice per label of the predictor on raw cases (imagesTr vs labelsTr)."""
    import SimpleITK as sitk

    scores: dict[str, list[float]] = {name: [] for name in labels}
    for case in cases:
        image = sitk.ReadImage(str(raw_folder / "imagesTr" / f"{case}_0000.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_folder / "labelsTr" / f"{case}.nii.gz")))
        spacing = tuple(reversed(image.GetSpacing()))
        prediction = predict(predictor, sitk.GetArrayFromImage(image), spacing)
        for name, value in labels.items():
            score = dice(prediction, truth, value)
            if not np.isnan(score):
                scores[name].append(score)
    return {name: float(np.mean(v)) if v else float("nan") for name, v in scores.items()}


def initial_network_weights(plans: dict, dataset_json: dict, seed: int = 0) -> dict:
    """One freshly initialised network for the plans, seeded: made once and given to every
    site (averaging independently initialised networks destroys them)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    labels = manager.get_label_manager(dataset_json)
    torch.manual_seed(seed)
    network = nnUNetTrainer.build_network_architecture(
        manager, configuration, len(dataset_json["channel_names"]), labels.num_segmentation_heads, True)
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


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

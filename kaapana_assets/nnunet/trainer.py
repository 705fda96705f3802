"""Training: how long and how wide (`Schedule`, its presets), our nnUNetTrainer subclass
(configurable optimizer, an epoch callback, FedProx's proximal term when it starts from given
weights) and the one initial network every federated site starts from. See the package doc
for why the trainer is instantiated directly and never looked up by name."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kaapana_assets.nnunet.device import Device, device_for
from kaapana_assets.nnunet.paths import CONFIGURATION, FOLD, PLANS, NnunetPaths, nnunet_environment
from kaapana_assets.nnunet.plan import with_width


class SchedulePreset(StrEnum):
    """The named schedules (NnunetResource.schedule, FederationResource.schedule, `kaapana demo --schedule`)."""

    FULL = "full"  # nnU-Net's own
    SHORT = "short"  # the demo's
    TINY = "tiny"  # the tests'


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
    def preset(cls, name: SchedulePreset | str, **overrides: Any) -> "Schedule":
        presets = {
            SchedulePreset.FULL: cls(),
            # Demo: minutes on 2 CPU cores, Dice ≈ 0.8 on the phantom liver.
            SchedulePreset.SHORT: cls(epochs=6, iterations_per_epoch=10, val_iterations=2, base_features=16,
                                      optimizer="adamw", learning_rate=3e-3),
            # Tests: ~15 s on 2 cores; 32 AdamW iterations reliably beat a trivial baseline
            # (12 iterations at width 8 did not, one run in three).
            SchedulePreset.TINY: cls(epochs=4, iterations_per_epoch=8, val_iterations=1, base_features=16,
                                     optimizer="adamw", learning_rate=3e-3),
        }
        if name not in presets:
            raise ValueError(f"unknown schedule {name!r}; one of {sorted(p.value for p in presets)}")
        return cls(**{**asdict(presets[SchedulePreset(name)]),
                      **{k: v for k, v in overrides.items() if v is not None}})


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
    paths: NnunetPaths,
    dataset_id: int,
    schedule: Schedule,
    split: dict[str, list[str]],
    device: Device | str = Device.AUTO,
    threads: int | None = None,
    on_epoch: EpochCallback | None = None,
    initial_weights: dict | None = None,
) -> TrainingResult:
    """Train fold 0 of the preprocessed dataset `dataset_id` under `paths` on `split` (from
    `initial_weights` when given: a federated round)."""
    with nnunet_environment(paths, threads=threads, training=True):
        # Imported with nnU-Net's environment set: nnunetv2 reads some of it at import.
        import torch
        from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

        if threads:
            torch.set_num_threads(threads)
        if schedule.seed is not None:
            seed_generators(schedule.seed)
        folder = paths.preprocessed / convert_id_to_dataset_name(dataset_id)
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


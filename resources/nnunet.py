"""nnU-Net settings of a site: where it works, on which device, and how long it trains."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from kaapana_assets.nnunet import Device, NnunetPaths, Schedule, SchedulePreset


class NnunetResource(dg.ConfigurableResource):
    workdir: str = Field(description="nnU-Net raw/preprocessed/results root, e.g. $KAAPANA_HOME/nnunet")
    device: str = Field(default=Device.AUTO.value, description="cpu, cuda or auto")
    threads: int = Field(default=2, description="CPU threads for torch and nnU-Net's worker pools")
    schedule: str = Field(default="", description="full (nnU-Net's own), short (demo) or tiny (tests); "
                          "empty: short")
    epochs: int | None = Field(default=None, description="override the schedule's epochs")
    iterations_per_epoch: int | None = None
    base_features: int | None = Field(default=None, description="network width of the first stage")
    promotion_dice: float = Field(default=0.8, description="validation Dice a model needs to become production")
    segmentation_model: str = Field(default="", description="registered model whose `production` version segments "
                                    "new studies; empty: nnunet-liver-train")
    resegment_cohort: str = Field(default="", description="cohort whose studies a new production model re-segments "
                                  "(the model_promotion sensor); empty: every CT study")

    def segmentation_model_name(self) -> str:
        return self.segmentation_model or "nnunet-liver-train"

    def model_cache(self) -> Path:
        return self.work_root().parent / "models"

    def work_root(self) -> Path:
        return Path(self.workdir)

    def paths(self, cohort: str, cohort_version: int) -> NnunetPaths:
        return NnunetPaths(self.work_root() / cohort / f"v{cohort_version}")

    def training_schedule(self) -> Schedule:
        name = self.schedule or SchedulePreset.SHORT
        return Schedule.preset(name, epochs=self.epochs, iterations_per_epoch=self.iterations_per_epoch,
                               base_features=self.base_features)

"""One tracked training run of a cohort's nnU-Net dataset: train, package, validate on the
held-out patients, log everything to MLflow and register a model version. Plain Python;
the trained_model asset only wires resources and metadata to it."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapana_assets import nnunet
from kaapana_assets.training.tracking import Tracking, code_version, model_name_for


@dataclass(frozen=True)
class DatasetRef:
    """What nnunet_dataset produced (its materialization metadata)."""

    cohort: str
    cohort_version: int
    membership_hash: str
    dataset_id: int
    raw_folder: Path
    nnunet_root: Path
    delta_versions_read: Mapping[str, int | None]

    @classmethod
    def from_metadata(cls, cohort: str, metadata: Mapping[str, Any]) -> "DatasetRef":
        return cls(cohort, int(metadata["cohort_version"]), str(metadata["membership_hash"]), int(metadata["dataset_id"]),
                   Path(metadata["dataset_folder"]), Path(metadata["nnunet_root"]),
                   dict(metadata.get("delta_versions_read") or {}))


@dataclass
class TrainingOutcome:
    model_name: str
    model_version: int
    run_id: str
    scores: dict[str, float]  # validation Dice per label
    required: list[str]
    gate: float  # the lowest Dice of the required labels
    passed: bool
    epochs: list[dict[str, float]]


def train_and_register(
    dataset: DatasetRef,
    required_labels: list[str],
    schedule: nnunet.Schedule,
    tracking: Tracking,
    promotion_dice: float,
    device: nnunet.Device | str = nnunet.Device.AUTO,
    threads: int = 2,
    tags: Mapping[str, str] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> TrainingOutcome:
    import mlflow

    paths = nnunet.NnunetPaths(dataset.nnunet_root)
    raw = dataset.raw_folder
    cases = json.loads((raw / "cases.json").read_text())
    split = nnunet.patient_split([(c["case"], c["patient_id"]) for c in cases])
    labels = {k: v for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items() if v}
    model_name = model_name_for(dataset.cohort)
    run_tags = {"kaapana.cohort": dataset.cohort, "kaapana.cohort_version": str(dataset.cohort_version), **(tags or {})}
    with tracking.run(f"train {dataset.cohort} v{dataset.cohort_version}", tags=run_tags) as run:
        mlflow.log_params({
            "cohort": dataset.cohort, "cohort_version": dataset.cohort_version,
            "membership_hash": dataset.membership_hash,
            **{f"delta_version.{table}": v for table, v in dataset.delta_versions_read.items()},
            "dataset_id": dataset.dataset_id, "configuration": nnunet.CONFIGURATION, "device": device,
            "train_cases": len(split["train"]), "val_cases": len(split["val"]),
            **{f"schedule.{k}": v for k, v in schedule.__dict__.items()}, **code_version(),
        })
        mlflow.log_dict(split, "split.json")
        for artifact in ("dataset.json", "cases.json"):
            mlflow.log_artifact(str(raw / artifact), "dataset")
        for artifact in (f"{nnunet.PLANS}.json", "dataset_fingerprint.json"):
            mlflow.log_artifact(str(paths.preprocessed / raw.name / artifact), "dataset")

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if v == v}, step=epoch)  # NaN is not a metric
            log(f"epoch {epoch + 1}/{schedule.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

        result = nnunet.train(paths, dataset.dataset_id, schedule, split, device, threads, on_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            folder = nnunet.package_model(result, Path(tmp) / "model")
            scores = nnunet.evaluate(nnunet.load_predictor(folder, device), raw, split["val"], labels)
            mlflow.log_metrics({f"val_dice_{k}": v for k, v in scores.items() if v == v})
            mlflow.log_artifacts(str(folder), "model")
        required = required_labels or list(labels)
        required_scores = [scores[k] for k in required if k in scores and scores[k] == scores[k]]
        gate = min(required_scores) if required_scores else 0.0
        passed = gate >= promotion_dice
        version = tracking.register(run.info.run_id, "model", model_name, tags={
            **run_tags, "kaapana.membership_hash": dataset.membership_hash,
            "kaapana.validation": "passed" if passed else "failed", "kaapana.validation_dice": f"{gate:.4f}",
        }, description=f"cohort {dataset.cohort} v{dataset.cohort_version}, {schedule.epochs} epochs")
    return TrainingOutcome(model_name, int(version.version), run.info.run_id, scores, required, gate, passed,
                           result.epochs)

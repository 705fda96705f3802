"""The model a site segments with: the MLflow version holding the alias `production`,
downloaded once per version and kept loaded per process. Also: importing any nnU-Net v2
results folder (e.g. pretrained weights already on disk) into the registry."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapana_assets.training import nnunet
from kaapana_assets.training.tracking import PRODUCTION, Tracking, code_version


class NoProductionModel(LookupError):
    pass


class InvalidModelFolder(ValueError):
    pass


@dataclass
class LoadedModel:
    name: str
    version: str
    folder: Path
    predictor: Any
    label_names: dict[int, str]  # label value -> name, from the model's dataset.json

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


_LOADED: dict[tuple[str, str, str], LoadedModel] = {}


def production_model(tracking: Tracking, model_name: str, cache: Path, device: str = "auto") -> LoadedModel:
    version = tracking.version_by_alias(model_name, PRODUCTION)
    if version is None:
        raise NoProductionModel(
            f"no version of model {model_name!r} holds the alias '{PRODUCTION}' in {tracking.tracking_uri}: "
            f"train one (the train_cohort job) or import one (`kaapana model import PATH --name {model_name}`), "
            f"then promote it"
        )
    key = (tracking.tracking_uri, model_name, str(version.version))
    if key in _LOADED:
        return _LOADED[key]
    folder = cache / model_name / f"v{version.version}"
    if not (folder / "dataset.json").exists():
        with tempfile.TemporaryDirectory(dir=cache.parent if cache.parent.exists() else None) as tmp:
            downloaded = tracking.download(version, Path(tmp))
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(downloaded, staging)
            staging.rename(folder)  # complete or absent, never half-copied
    dataset = json.loads((folder / "dataset.json").read_text())
    label_names = {int(v): k for k, v in dataset["labels"].items()}
    loaded = LoadedModel(model_name, str(version.version), folder, nnunet.load_predictor(folder, device), label_names)
    _LOADED[key] = loaded
    return loaded


def validate_model_folder(folder: Path) -> list[Path]:
    """An nnU-Net v2 results folder: dataset.json, plans.json, fold_*/checkpoint_final.pth."""
    missing = [name for name in ("dataset.json", "plans.json") if not (folder / name).is_file()]
    checkpoints = sorted(folder.glob("fold_*/checkpoint_final.pth"))
    if missing or not checkpoints:
        raise InvalidModelFolder(
            f"{folder} is not an nnU-Net v2 results folder: "
            + ", ".join([*(f"no {m}" for m in missing), *([] if checkpoints else ["no fold_*/checkpoint_final.pth"])])
        )
    return checkpoints


def import_model(tracking: Tracking, folder: Path, model_name: str, promote: bool = False) -> Any:
    """Register a model folder in MLflow. Checkpoints whose trainer is not nnUNetTrainer are
    rewritten to say nnUNetTrainer (the original name is kept as a tag): on CPU-only torch,
    nnU-Net's lookup of other trainer names crashes, and prediction needs only the plans."""
    import mlflow
    import torch

    checkpoints = validate_model_folder(folder)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.pth", "validation", "*.png", "*.log*"))
        trainers = set()
        for checkpoint in checkpoints:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            trainers.add(str(state.get("trainer_name")))
            state["trainer_name"] = "nnUNetTrainer"
            state["optimizer_state"] = None
            target = copy / checkpoint.parent.name / checkpoint.name
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, target)
        nnunet.load_predictor(copy, "cpu")  # it must load before it is registered
        with tracking.run(f"import {model_name}", tags={"kaapana.imported_from": str(folder)}) as run:
            mlflow.log_params({"imported_from": str(folder), "original_trainers": ",".join(sorted(trainers)),
                               "folds": ",".join(c.parent.name for c in checkpoints), **code_version()})
            mlflow.log_artifacts(str(copy), "model")
        version = tracking.register(run.info.run_id, "model", model_name, tags={
            "kaapana.imported_from": str(folder), "kaapana.original_trainers": ",".join(sorted(trainers)),
            "kaapana.validation": "imported",
        }, description=f"imported from {folder}")
    if promote:
        tracking.promote(model_name, version.version)
    return version

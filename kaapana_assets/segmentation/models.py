"""The model a site segments with: the MLflow version holding the alias `production`,
downloaded once per version and kept loaded per process. Also: importing any nnU-Net v2
results folder (e.g. pretrained weights already on disk) into the registry."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapana_assets import nnunet
from kaapana_assets.nnunet.registry import require_version
from kaapana_assets.training.tracking import Tracking, code_version

# What segmenting a study first imports and loads (preload.preload's names): a run that will
# segment does this while it waits for its studies (the ingest step's warm_imports).
PREDICTION_IMPORTS: tuple[str, ...] = (
    "torch",  # with nnU-Net's predictor, ≈2.5 s on this machine's cores
    "batchgenerators.utilities.file_and_folder_operations",
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.utilities.get_network_from_plans",
    "nnunetv2.utilities.label_handling.label_handling",
    "nnunetv2.utilities.plans_handling.plans_handler",
    "SimpleITK",
    # The standard's module tables, which highdicom loads (0.5 s of JSON) the first time it
    # assembles a volume or writes a SEG in a process, then caches.
    "highdicom._standard_utils:get_module_attribute_map",
)


class InvalidModelFolder(ValueError):
    pass


@dataclass
class LoadedModel:
    name: str
    version: str
    folder: Path
    predictor: Any
    label_names: dict[int, str]  # label value -> name, from the model's dataset.json
    # nnUNetPredictor reloads its weights into one network per call: one prediction at a time.
    predicting: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


# Loaded predictors, per process, keyed by (registry, model name, version, device): a run that
# segments several studies, or a long-lived code server, loads a model version once. The
# alias is still looked up every call, so a promotion takes effect at the next study.
_LOADED: dict[tuple[str, str, str, str], LoadedModel] = {}
_LOADING = threading.Lock()  # threads of one run segmenting studies load a version once


def production_model(tracking: Tracking, model_name: str, cache: Path,
                     device: nnunet.Device | str = nnunet.Device.AUTO) -> LoadedModel:
    version = require_version(tracking, model_name, alias_hint=(
        f"train one (the train_cohort job) or import one (`kaapana model import PATH --name {model_name}`), "
        f"then promote it"))
    return loaded_version(tracking, version, model_name, cache, device)


def loaded_version(tracking: Tracking, version: Any, model_name: str, cache: Path,
                   device: nnunet.Device | str = nnunet.Device.AUTO) -> LoadedModel:
    """A registry ModelVersion loaded for prediction, once per process (see _LOADED)."""
    return _loaded(tracking, model_name, str(version.version), cache, device, lambda: version)


def pinned_model(tracking: Tracking, model_name: str, version: str, cache: Path,
                 device: nnunet.Device | str = nnunet.Device.AUTO) -> LoadedModel:
    """A version resolved earlier (the incoming sensor pins the production version it saw into
    the run it requests). Versions are immutable: when this site's cache holds it, it loads
    without asking the registry (importing MLflow and opening its store cost a fresh run
    process ≈1.5 s); otherwise it is looked up and downloaded as usual."""
    return _loaded(tracking, model_name, version, cache, device,
                   lambda: require_version(tracking, model_name, version))


def _loaded(tracking: Tracking, model_name: str, version: str, cache: Path, device: str,
            registry_version: Callable[[], Any]) -> LoadedModel:
    key = (tracking.tracking_uri, model_name, version, device)
    loaded = _LOADED.get(key)
    if loaded is not None:
        return loaded
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = _load(tracking, registry_version, model_name, version, cache, device)
        return _LOADED[key]


def _load(tracking: Tracking, registry_version: Callable[[], Any], model_name: str, version: str, cache: Path,
          device: str) -> LoadedModel:
    """Download a version into the cache folder (once per site) and load its predictor."""
    folder = cache / model_name / f"v{version}"
    if not (folder / "dataset.json").exists():
        found = registry_version()
        with tempfile.TemporaryDirectory(dir=cache.parent if cache.parent.exists() else None) as tmp:
            downloaded = tracking.download(found, Path(tmp))
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(downloaded, staging)
            try:
                staging.rename(folder)  # complete or absent, never half-copied
            except OSError:
                if not (folder / "dataset.json").exists():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # another process put the same version there first
    dataset = json.loads((folder / "dataset.json").read_text())
    label_names = {int(v): k for k, v in dataset["labels"].items()}
    return LoadedModel(model_name, version, folder, nnunet.load_predictor(folder, device), label_names)


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
        nnunet.load_predictor(copy, nnunet.Device.CPU)  # it must load before it is registered
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

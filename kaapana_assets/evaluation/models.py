"""The model version an evaluation measures: any registered version of a model, or the one
holding the alias `production`. Downloaded into the same cache folder the segmentation
automation uses (`<cache>/<model>/v<version>`), so a version is fetched once per site."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kaapana_assets.segmentation.models import LoadedModel
from kaapana_assets.training import nnunet
from kaapana_assets.training.tracking import PRODUCTION, Tracking


class UnknownModelVersion(LookupError):
    pass


_LOADED: dict[tuple[str, str, str, str], LoadedModel] = {}


def resolve_version(tracking: Tracking, model_name: str, version: str | int | None = None) -> Any:
    """The registry's ModelVersion: `version` when given, else the one holding `production`."""
    from mlflow.exceptions import MlflowException

    if version in (None, ""):
        found = tracking.version_by_alias(model_name, PRODUCTION)
        if found is None:
            raise UnknownModelVersion(f"no version of {model_name!r} holds the alias '{PRODUCTION}' in "
                                      f"{tracking.tracking_uri}; name a version to evaluate")
        return found
    try:
        return tracking.client().get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise UnknownModelVersion(f"{model_name} v{version} is not registered in {tracking.tracking_uri}: "
                                  f"{exc.message}") from None


def load_model(tracking: Tracking, model_name: str, version: str | int | None, cache: Path,
               device: str = "auto") -> LoadedModel:
    """A registered model version, loaded for prediction (kept per process)."""
    model_version = resolve_version(tracking, model_name, version)
    number = str(model_version.version)
    key = (tracking.tracking_uri, model_name, number, device)
    if key in _LOADED:
        return _LOADED[key]
    folder = cache / model_name / f"v{number}"
    if not (folder / "dataset.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            downloaded = tracking.download(model_version, Path(tmp) / "download")
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(downloaded, staging)
            try:
                staging.rename(folder)  # complete or absent, never half-copied
            except OSError:
                if not (folder / "dataset.json").exists():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # another run put the same version there first
    dataset = json.loads((folder / "dataset.json").read_text())
    label_names = {int(v): k for k, v in dataset["labels"].items()}
    loaded = LoadedModel(model_name, number, folder, nnunet.load_predictor(folder, device), label_names)
    _LOADED[key] = loaded
    return loaded

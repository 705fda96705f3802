"""The model version an evaluation measures: any registered version of a model, or the one
holding the alias `production`. Downloaded into the same cache folder the segmentation
automation uses (`<cache>/<model>/v<version>`), so a version is fetched once per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kaapana_assets.nnunet import Device
from kaapana_assets.nnunet.registry import require_version
from kaapana_assets.segmentation.models import LoadedModel, loaded_version
from kaapana_assets.training.tracking import Tracking


def resolve_version(tracking: Tracking, model_name: str, version: str | int | None = None) -> Any:
    """The registry's ModelVersion: `version` when given, else the one holding `production`
    (ModelVersionNotFound when there is none)."""
    return require_version(tracking, model_name, version, alias_hint="name a version to evaluate")


def load_model(tracking: Tracking, model_name: str, version: str | int | None, cache: Path,
               device: Device | str = Device.AUTO) -> LoadedModel:
    """A registered model version, loaded for prediction (kept per process, shared with the
    segmentation automation's cache)."""
    return loaded_version(tracking, resolve_version(tracking, model_name, version), model_name, cache, device)

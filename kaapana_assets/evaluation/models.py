"""The model version an evaluation measures: any registered version of a model, or the one
holding the alias `production`. Downloaded into the same cache folder the segmentation
automation uses (`<cache>/<model>/v<version>`), so a version is fetched once per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kaapana_assets.segmentation.models import LoadedModel, loaded_version
from kaapana_assets.training.tracking import PRODUCTION, Tracking


class UnknownModelVersion(LookupError):
    pass




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
    """A registered model version, loaded for prediction (kept per process, shared with the
    segmentation automation's cache)."""
    return loaded_version(tracking, resolve_version(tracking, model_name, version), model_name, cache, device)

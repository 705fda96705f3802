"""The model registry's one lookup: which registered version of a model a version number, or
an alias (`production` unless told otherwise), names.

MLflow holds the registry; `kaapana_assets.training.tracking.Tracking` opens it (and writes
to it: register, promote). Everything that reads a model version from it — the segmentation
automation, evaluation, lineage, the sensors — asks here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

PRODUCTION = "production"  # the alias of the version a site segments with


class ModelVersionNotFound(LookupError):
    """The model has no such version, or no version holds the alias."""


class Registry(Protocol):
    """What the lookup needs of a registry handle (a Tracking): where it is, and its client."""

    tracking_uri: str

    def client(self) -> Any: ...


def _store_exists(registry: Registry) -> bool:
    """False for a local sqlite store that does not exist yet."""
    uri = registry.tracking_uri
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).exists()


def find_version(registry: Registry, model_name: str, version: str | int | None = None,
                 alias: str = PRODUCTION) -> Any | None:
    """The registry's ModelVersion of `model_name`: `version` when given (not None or ""),
    else the one holding `alias`; None when there is none. A local sqlite store that does
    not exist yet holds none, and is not asked (asking would create it)."""
    if not _store_exists(registry):
        return None
    from mlflow.exceptions import MlflowException

    try:
        if version not in (None, ""):
            return registry.client().get_model_version(model_name, str(version))
        return registry.client().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def require_version(registry: Registry, model_name: str, version: str | int | None = None,
                    alias: str = PRODUCTION, alias_hint: str = "") -> Any:
    """find_version, or ModelVersionNotFound saying what is missing and where (and, when no
    version holds the alias, `alias_hint`: what to do about it)."""
    found = find_version(registry, model_name, version, alias)
    if found is not None:
        return found
    where = registry.tracking_uri
    if version not in (None, ""):
        raise ModelVersionNotFound(f"model {model_name!r} has no version {version} in {where}")
    message = f"no version of model {model_name!r} holds the alias '{alias}' in {where}"
    raise ModelVersionNotFound(f"{message}; {alias_hint}" if alias_hint else message)

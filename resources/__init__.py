"""ConfigurableResources: thin, typed handles on the site's storage and services."""

from resources.cohorts import CohortDefinitionsResource
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource, build_resources

__all__ = [
    "ArchiveResource",
    "CohortDefinitionsResource",
    "LakeResource",
    "MlflowResource",
    "NnunetResource",
    "build_resources",
]

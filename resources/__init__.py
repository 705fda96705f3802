"""ConfigurableResources: thin, typed handles on the site's storage and services."""

from resources.build import build_resources, site_resources
from resources.cohorts import CohortDefinitionsResource
from resources.dicom_node import DicomNodeResource, DicomWebResource
from resources.federation import FederatedSiteResource, FederationResource
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource
from resources.viewer import ViewerResource

__all__ = [
    "ArchiveResource",
    "CohortDefinitionsResource",
    "DicomNodeResource",
    "DicomWebResource",
    "FederatedSiteResource",
    "FederationResource",
    "LakeResource",
    "MlflowResource",
    "NnunetResource",
    "ViewerResource",
    "build_resources",
    "site_resources",
]

"""ConfigurableResources: thin, typed handles on the site's storage and services."""

from resources.cohorts import CohortDefinitionsResource
from resources.storage import ArchiveResource, LakeResource, build_resources

__all__ = ["ArchiveResource", "CohortDefinitionsResource", "LakeResource", "build_resources"]

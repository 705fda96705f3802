"""ConfigurableResources: thin, typed handles on the site's storage and services."""

from resources.storage import ArchiveResource, LakeResource, build_resources

__all__ = ["ArchiveResource", "LakeResource", "build_resources"]

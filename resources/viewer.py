"""The OHIF viewer on the DICOMweb service: where a browser reaches it, so that materializations
link their studies and SEGs into it."""

import dagster as dg
from pydantic import Field

from kaapana_assets.dicomweb.links import SegView, viewer_url


class ViewerResource(dg.ConfigurableResource):
    url: str = Field(description="The DICOMweb service with the OHIF viewer (`kaapana dicomweb --viewer`), as a "
                     "browser reaches it (KAAPANA_VIEWER_URL)")

    def study(self, study_uid: str) -> dg.UrlMetadataValue:
        """A link that opens the study in the viewer."""
        return dg.MetadataValue.url(viewer_url(self.url, study_uid))

    def segmentation(self, study_uid: str, image_series_uid: str, seg_series_uid: str) -> dg.UrlMetadataValue:
        """A link that opens the SEG over the series it segments, its segments listed."""
        return dg.MetadataValue.url(viewer_url(self.url, study_uid, SegView(seg_series_uid, image_series_uid)))

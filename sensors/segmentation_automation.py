"""`segmentation_automation`: materializes `segmentations` where its eager condition asks."""

import dagster as dg

from kaapana_assets.segmentation.assets import segmentations

# The fallback for studies ingested otherwise (`kaapana ingest`, an ingest_study run while no
# model was in production): the incoming sensor's own runs segment as they ingest, and eager
# never requests a partition whose run is in progress or that was updated with its parent.
segmentation_automation = dg.AutomationConditionSensorDefinition(
    "segmentation_automation",
    target=[segmentations],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Segments every study ingested without its segmentation (segmentations are eager on dicom_studies).",
)

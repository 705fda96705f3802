"""The worked extension: `study_metrics`, an external program per study through Pipes.

To add an algorithm: put a program under extensions/programs/ (or in an image), declare
an asset like this one with its upstream asset and partitions, and hand the inputs over
as Pipes extras. The program reports metadata (and checks, if it likes) back."""

import dagster as dg

from kaapana_assets.extensions.inputs import study_files
from kaapana_assets.ingest.assets import dicom_studies
from kaapana_assets.ingest.partitions import studies_partitions
from resources.extensions import ExtensionRunner
from resources.storage import ArchiveResource, LakeResource


@dg.asset(partitions_def=studies_partitions, deps=[dicom_studies], group_name="extensions", kinds={"python"},
          description="Per-study metrics from an external program (Dagster Pipes): files, modalities, slice "
                      "thickness, HU statistics of the body.")
def study_metrics(context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource,
                  extensions: ExtensionRunner) -> dg.MaterializeResult:
    try:
        files = study_files(lake.lake(), archive.kaapana_home().archive, context.partition_key)
    except LookupError as exc:
        raise dg.Failure(description=str(exc)) from None
    return extensions.run(context, "study_metrics", {"study_uid": context.partition_key, "files": files})


defs = dg.Definitions(assets=[study_metrics])

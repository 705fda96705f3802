"""Delta maintenance as an asset with a nightly schedule (the logic: maintenance.py)."""

from dataclasses import asdict

import dagster as dg
from pydantic import Field

from kaapana_assets.lake.maintenance import maintain_lake
from kaapana_assets.lake.schemas import TABLES
from kaapana_assets.metadata_table import columns, table
from resources.storage import LakeResource

REPORT_SCHEMA = columns(
    ("table", "string"), ("files_before", "int", "data files of the latest version before"),
    ("files_after", "int", "after compaction"), ("files_on_disk_before", "int"), ("files_on_disk_after", "int"),
    ("version_after", "int"), ("retention_hours", "float", "vacuum retention used"),
    ("protected_version", "int", "oldest version a cohort snapshot reads"), ("vacuumed", "int"),
)


class MaintenanceConfig(dg.Config):
    minimum_retention_hours: float = Field(default=168.0, description="Vacuum never deletes files removed more "
                                           "recently than this; extended to reach every cohort's source version")


@dg.asset(group_name="lake", kinds={"delta"},
          description="Compact the Delta tables' small files, checkpoint their logs and vacuum what no version "
                      "still needs, keeping every version a cohort snapshot reads (time travel).")
def lake_maintenance(context: dg.AssetExecutionContext, config: MaintenanceConfig,
                     lake: LakeResource) -> dg.MaterializeResult:
    reports = maintain_lake(lake.lake(), sorted(TABLES.values(), key=lambda spec: spec.name),
                            config.minimum_retention_hours)
    for report in reports:
        context.log.info(f"{report.table}: {report.files_before} → {report.files_after} files, "
                         f"{report.vacuumed} vacuumed (retention {report.retention_hours:.0f} h)")
    return dg.MaterializeResult(metadata={
        "tables": table([asdict(r) for r in reports], REPORT_SCHEMA),
        "files_before": sum(r.files_before for r in reports),
        "files_after": sum(r.files_after for r in reports),
        "vacuumed": sum(r.vacuumed for r in reports),
    })


lake_maintenance_job = dg.define_asset_job("lake_maintenance_job", selection=[lake_maintenance])
nightly_maintenance = dg.ScheduleDefinition(job=lake_maintenance_job, cron_schedule="30 3 * * *",
                                            default_status=dg.DefaultScheduleStatus.RUNNING,
                                            description="Delta compaction, checkpoint and vacuum at 03:30")
defs = dg.Definitions(assets=[lake_maintenance], jobs=[lake_maintenance_job], schedules=[nightly_maintenance])

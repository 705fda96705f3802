"""The audit trail's figures as an asset's metadata, refreshed every hour (the logic: audit.py)."""

import dagster as dg

from kaapana_assets.access.audit import audit_figures
from kaapana_assets.metadata_table import columns, table
from resources.storage import LakeResource

BY_USER_SCHEMA = columns(
    ("user", "string"), ("action", "string", "search | retrieve | client-read | run-launch"),
    ("accesses", "int", "in the last 24 hours"), ("projects", "string", "the user's projects"),
    ("last_at", "string", "the latest, UTC"),
)


@dg.asset(group_name="access", kinds={"delta"},
          description="Who accessed patient data in the last 24 hours (DICOMweb retrieves, client reads, run "
                      "launches through the gateway), from the `audit` table the gateway, the DICOMweb service "
                      "and the client append to.")
def audit_trail(lake: LakeResource) -> dg.MaterializeResult:
    figures = audit_figures(lake.lake())
    return dg.MaterializeResult(metadata={
        "audit_table_version": figures.version,
        "rows": figures.rows,
        "latest_at": figures.latest_at.isoformat() if figures.latest_at else None,
        "accesses_24h": figures.window_rows,
        "users_24h": figures.window_users,
        "by_user_and_action": table(figures.by_user_action, BY_USER_SCHEMA),
    }, data_version=dg.DataVersion(f"audit v{figures.version}"))


audit_trail_job = dg.define_asset_job("audit_trail_job", selection=[audit_trail])
hourly_audit_trail = dg.ScheduleDefinition(job=audit_trail_job, cron_schedule="5 * * * *",
                                           default_status=dg.DefaultScheduleStatus.RUNNING,
                                           description="The audit trail's figures, every hour")
defs = dg.Definitions(assets=[audit_trail], jobs=[audit_trail_job], schedules=[hourly_audit_trail])

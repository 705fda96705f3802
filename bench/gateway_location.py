"""A small Dagster code location behind the gateway (bench/gateway.py, tests/gateway): one asset
partitioned by cohort, so a launch names a cohort partition as the platform's cohort runs do.
(The platform's own code location takes a minute to load on CI's two cores; the gateway decides
by the partition alone.)"""

import dagster as dg

cohorts = dg.StaticPartitionsDefinition(["cohort-a", "cohort-b"])


@dg.asset(partitions_def=cohorts)
def cohort_snapshot() -> None:
    """Stands in for a cohort's snapshot: the run's content does not matter to the gateway."""


cohort_job = dg.define_asset_job("cohort_job", selection=[cohort_snapshot], partitions_def=cohorts)
defs = dg.Definitions(assets=[cohort_snapshot], jobs=[cohort_job])

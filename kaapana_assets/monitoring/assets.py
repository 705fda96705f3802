"""Dagster wiring of the network monitor: `network_statistics` at the hub, on a schedule and
on demand. One Flower run asks every site of the federation for its aggregates (the
`statistics` step, steps.py); the answers, a stale site's last known figures and the
network total go to Delta. The work happens in plain modules (figures, network, chart)."""

import datetime as dt

import dagster as dg
import pyarrow as pa
from pydantic import Field

from kaapana_assets.federation.guard import DEFAULT_THRESHOLD, MAX_THRESHOLD
from kaapana_assets.federation.runs import FlowerRunFailed
from kaapana_assets.lake.schemas import NETWORK_SITES, NETWORK_STATISTICS
from kaapana_assets.metadata_table import columns, table
from kaapana_assets.monitoring.chart import bar_chart_markdown
from kaapana_assets.monitoring.figures import EXPERIMENT, STEP
from kaapana_assets.monitoring.network import (
    FRESH,
    NETWORK,
    collect,
    new_request_id,
    outcomes_from_result,
    pivot,
    remember,
    remove_request,
    write_request,
)
from kaapana_assets.projects.membership import ProjectNameError, project_name
from resources.federation import FederationResource
from resources.storage import LakeResource

GROUP = "monitoring"
SITES_SCHEMA = columns(
    ("site", "string"), ("status", "string", "fresh: answered now; stale: last known figures; unavailable: none"),
    ("figures_at", "string", "when the site computed the figures"), ("last_ingest_at", "string"),
    ("threshold", "int", "small-cell threshold the site applied"), ("suppressed_cells", "int"),
    ("reason", "string"), ("message", "string"),
)


class NetworkStatisticsConfig(dg.Config):
    threshold: int = Field(default=DEFAULT_THRESHOLD, ge=1, le=MAX_THRESHOLD,
                           description="Small-cell threshold: counts from 1 to threshold-1 leave a site as "
                                       "'<threshold' (a site may apply a higher floor of its own)")
    timeout_s: float = Field(default=120.0, gt=0, description="How long the hub waits for the sites' answers; "
                                                              "a site that does not answer is reported stale")
    project: str = Field(default="", description="Count only this research project's series, studies and cohorts "
                                                 "at every site (empty: whole sites, which the exporter shows)")


def _network_table(rows: list[dict], sites: list[str]) -> dg.TableMetadataValue:
    schema = columns(("metric", "string"), ("dimension", "string"), ("category", "string"),
                     *((site, "string") for site in sites), (NETWORK, "string", "network total"))
    return table(rows, schema)


def _time(value: object) -> str | None:
    return value.isoformat() if isinstance(value, dt.datetime) else None


@dg.asset(group_name=GROUP, kinds={"deltalake", "prometheus", "flower"},
          description="The network view at the hub: every site's aggregates (patients, studies, series and "
                      "instances per modality, manufacturer and body part; sex, age and slice-thickness "
                      "histograms; quarantine reasons; cohort sizes; last ingest), asked over the federation "
                      "channel, small cells suppressed at the site, merged with a network total. A site that "
                      "does not answer is reported stale with its last known figures.")
def network_statistics(context: dg.AssetExecutionContext, config: NetworkStatisticsConfig,
                       federation: FederationResource, lake: LakeResource) -> dg.MaterializeResult:
    sites = [site.name for site in federation.sites()]
    if NETWORK in sites:
        raise dg.Failure(description=f"a site may not be called {NETWORK!r}: that is the network total's name")
    try:
        project = project_name(config.project) if config.project.strip() else None
    except ProjectNameError as exc:
        raise dg.Failure(description=f"project: {exc}") from None
    store = federation.store()
    request = new_request_id()
    write_request(store, request, config.threshold, config.timeout_s, project)
    try:
        result = federation.run_step(STEP, EXPERIMENT, request, context.log.info)
    except FlowerRunFailed as exc:  # the channel itself failed: every site is reported stale
        context.log.warning(str(exc))
        result = {"ok": False, "error": str(exc)}
    finally:
        remove_request(store, request)
    collected_at = dt.datetime.now(dt.timezone.utc)
    outcomes = outcomes_from_result(result, sites, config.threshold, store, project)
    remember(store, {o.site: o.answer for o in outcomes if o.status == FRESH and o.answer is not None})
    collection = collect(str(request), collected_at, config.threshold, outcomes, project)

    the_lake = lake.lake()
    written = the_lake.merge(NETWORK_STATISTICS,
                             pa.Table.from_pylist(collection.cell_rows, schema=NETWORK_STATISTICS.schema))
    sites_written = the_lake.merge(NETWORK_SITES,
                                   pa.Table.from_pylist(collection.site_rows, schema=NETWORK_SITES.schema))
    for outcome in outcomes:
        if outcome.status != FRESH:
            context.log.warning(f"{outcome.site} is {outcome.status}: {outcome.reason}: {outcome.message}")
    return dg.MaterializeResult(metadata={
        "snapshot_id": dg.MetadataValue.text(collection.snapshot_id),
        "project": dg.MetadataValue.text(project or "(whole sites)"),
        "fresh_sites": dg.MetadataValue.int(len(collection.fresh)),
        "stale_sites": dg.MetadataValue.json(collection.stale),
        "threshold": dg.MetadataValue.int(config.threshold),
        "sites": table(({**row, "figures_at": _time(row["figures_at"]), "last_ingest_at": _time(row["last_ingest_at"])}
                        for row in collection.site_rows), SITES_SCHEMA),
        "network": _network_table(pivot(collection), sites),
        "per_site_chart": dg.MetadataValue.md(bar_chart_markdown(collection)),
        "channel_error": dg.MetadataValue.text(str(result.get("error", ""))[:2000]),
        "delta_version": dg.MetadataValue.int(written.version or 0),
        "delta_versions": dg.MetadataValue.json({"network_statistics": written.version,
                                                 "network_sites": sites_written.version}),
    })


network_statistics_job = dg.define_asset_job("network_statistics_job", selection=[network_statistics],
                                             description="Collect every site's aggregates now (on demand)")


@dg.schedule(job=network_statistics_job, cron_schedule="0 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Every hour, at a hub (a code location without a federation file skips)")
def network_statistics_schedule(context: dg.ScheduleEvaluationContext,
                                federation: FederationResource) -> dg.RunRequest | dg.SkipReason:
    if not federation.federation_file:
        return dg.SkipReason("no federation configured (KAAPANA_FEDERATION): this code location is not a hub")
    return dg.RunRequest(run_key=None)


defs = dg.Definitions(assets=[network_statistics], jobs=[network_statistics_job],
                      schedules=[network_statistics_schedule])

"""Dagster wiring of cohorts: the cohorts asset, its blocking harmonization checks, and
site statistics. The work happens in plain modules (membership, harmonization, statistics)."""

import datetime as dt
import uuid

import dagster as dg
import pyarrow as pa

from kaapana_assets.cohorts.check_records import CheckRecord, record_check
from kaapana_assets.cohorts.definitions import CohortDefinition, CohortDefinitionError
from kaapana_assets.cohorts.exclusion import UnknownExcludedCohort
from kaapana_assets.cohorts.harmonization import CHECKS, offending_rows
from kaapana_assets.cohorts.membership import EmptyCohort, read_cohort, snapshot_cohort
from kaapana_assets.cohorts.partitions import cohorts_partitions
from kaapana_assets.cohorts.statistics import (
    compute_statistics,
    openmetrics_text,
    statistics_rows,
    statistics_table,
    write_textfile,
)
from kaapana_assets.ingest.assets import dicom_studies, quarantine
from kaapana_assets.lake.schemas import SITE_STATISTICS
from kaapana_assets.metadata_table import columns, table
from resources.cohorts import CohortDefinitionsResource
from resources.storage import ArchiveResource, LakeResource

SITES_SCHEMA = columns(("site", "string", "institution"), ("series", "int"))
OFFENDING_SCHEMA = columns(
    ("series_uid", "string"), ("study_uid", "string"), ("site", "string", "institution"), ("problem", "string")
)
STATISTICS_SCHEMA = columns(("metric", "string"), ("labels", "string"), ("value", "float"))


def _definition(cohort_definitions: CohortDefinitionsResource, name: str) -> CohortDefinition:
    try:
        return cohort_definitions.get(name)
    except CohortDefinitionError as exc:
        raise dg.Failure(description=f"invalid cohort definition: {exc}") from None


@dg.asset(
    partitions_def=cohorts_partitions,
    group_name="cohorts",
    kinds={"deltalake"},
    deps=[dg.AssetDep(dicom_studies, partition_mapping=dg.AllPartitionMapping())],
    description="A curated cohort: its membership snapshotted as a numbered version in cohort_members.",
)
def cohorts(
    context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource,
    cohort_definitions: CohortDefinitionsResource,
) -> dg.MaterializeResult:
    definition = _definition(cohort_definitions, context.partition_key)
    # Which SEGs are references is read from their segments' provenance (cohorts/references.py):
    # SEGs indexed before `seg_segments` existed get theirs recorded first.
    recorded = archive.open(lake.lake()).reindex_segments()
    if recorded:
        context.log.info(f"recorded {recorded} segment(s) of SEGs indexed without them")
    try:
        snapshot = snapshot_cohort(lake.lake(), definition)
    except (EmptyCohort, UnknownExcludedCohort) as exc:
        raise dg.Failure(description=str(exc)) from None
    per_site = snapshot.members.group_by("institution").len().sort("institution")
    context.log.info(
        f"cohort {snapshot.cohort} v{snapshot.version}: {snapshot.size} series"
        + (" (new version)" if snapshot.created else " (membership unchanged)")
    )
    return dg.MaterializeResult(
        metadata={
            "cohort_version": dg.MetadataValue.int(snapshot.version),
            "new_version": dg.MetadataValue.bool(snapshot.created),
            "purpose": dg.MetadataValue.text(definition.purpose),
            "project": dg.MetadataValue.text(snapshot.project),
            "series": dg.MetadataValue.int(snapshot.size),
            "patients": dg.MetadataValue.int(snapshot.members["patient_id"].n_unique()),
            "sites": table(({"site": s, "series": n} for s, n in per_site.iter_rows()), SITES_SCHEMA),
            "membership_hash": dg.MetadataValue.text(snapshot.membership_hash),
            "definition_hash": dg.MetadataValue.text(definition.digest()),
            "delta_versions_read": dg.MetadataValue.json(
                {"series": snapshot.series_table_version, "tags": snapshot.tags_table_version,
                 "instances": snapshot.instances_table_version,
                 "segmentations": snapshot.segmentations_table_version,
                 "series_projects": snapshot.series_projects_table_version}
            ),
            "excluded_cohorts": dg.MetadataValue.json(snapshot.excluded_cohorts),
            "delta_version": dg.MetadataValue.int(snapshot.cohort_members_version or 0),
        },
        data_version=dg.DataVersion(snapshot.membership_hash),
    )


def _harmonization_check(name: str) -> dg.AssetChecksDefinition:
    check = CHECKS[name]

    @dg.asset_check(
        asset=cohorts,
        name=name,
        blocking=True,
        partitions_def=cohorts_partitions,
        description=(check.__doc__ or name.replace("_", " ")).strip(),
    )
    def _check(
        context: dg.AssetCheckExecutionContext, lake: LakeResource, cohort_definitions: CohortDefinitionsResource
    ) -> dg.AssetCheckResult:
        definition = _definition(cohort_definitions, context.partition_key)
        snapshot = read_cohort(lake.lake(), context.partition_key)
        outcome = check(snapshot, definition)
        # Recorded in the lake: export and training read the gate from there (check_records.py).
        recorded = record_check(lake.lake(), CheckRecord(
            snapshot.cohort, snapshot.version, name, outcome.passed, outcome.description, len(outcome.offending),
            definition.digest()))
        metadata: dict[str, dg.MetadataValue] = {
            "cohort_checks_version": dg.MetadataValue.int(recorded or 0),
            "cohort_version": dg.MetadataValue.int(snapshot.version),
            "offending_count": dg.MetadataValue.int(len(outcome.offending)),
            **{k: dg.MetadataValue.json(v) if isinstance(v, dict) else dg.MetadataValue.float(float(v))
               for k, v in outcome.values.items()},
        }
        if outcome.offending:
            metadata["offending_series"] = table(offending_rows(outcome.offending), OFFENDING_SCHEMA)
        return dg.AssetCheckResult(
            passed=outcome.passed, description=outcome.description, metadata=metadata,
            severity=dg.AssetCheckSeverity.ERROR,
        )

    return _check


harmonization_checks = [_harmonization_check(name) for name in CHECKS]


@dg.asset(
    group_name="cohorts",
    kinds={"deltalake", "prometheus"},
    deps=[dg.AssetDep(dicom_studies, partition_mapping=dg.AllPartitionMapping()), quarantine,
          dg.AssetDep(cohorts, partition_mapping=dg.AllPartitionMapping())],
    description="Patients, studies, series and instances per modality, quarantine and cohort sizes: "
    "a Delta table and an OpenMetrics file for Prometheus' textfile collector.",
)
def site_statistics(lake: LakeResource, archive: ArchiveResource) -> dg.MaterializeResult:
    the_lake, site = lake.lake(), archive.site_name()
    samples = compute_statistics(the_lake)
    now = dt.datetime.now(dt.timezone.utc)
    written = the_lake.merge(
        SITE_STATISTICS,
        pa.Table.from_pylist(statistics_rows(samples, site, uuid.uuid4().hex, now), schema=SITE_STATISTICS.schema),
    )
    path = archive.kaapana_home().root / "metrics" / "kaapana.prom"
    write_textfile(path, openmetrics_text(samples, site))
    value = {s.metric: s.value for s in samples if not s.labels}
    return dg.MaterializeResult(
        metadata={
            "site": dg.MetadataValue.text(site),
            "patients": dg.MetadataValue.int(int(value.get("kaapana_dicom_patients_total", 0))),
            "studies": dg.MetadataValue.int(int(value.get("kaapana_dicom_studies_total", 0))),
            "statistics": table(statistics_table(samples), STATISTICS_SCHEMA),
            "openmetrics_file": dg.MetadataValue.path(str(path)),
            "delta_version": dg.MetadataValue.int(written.version or 0),
        },
    )


cohort_job = dg.define_asset_job(
    "materialize_cohort",
    selection=dg.AssetSelection.assets(cohorts),
    description="Snapshot a cohort and run its harmonization checks.",
)

defs = dg.Definitions(
    assets=[cohorts, site_statistics], asset_checks=harmonization_checks, jobs=[cohort_job]
)

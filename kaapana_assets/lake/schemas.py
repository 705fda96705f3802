"""Schemas of the Delta tables. One place, so every domain writes the same columns.

Keys are DICOM UIDs wherever the row describes a DICOM object: MERGEs on them make
re-ingestion idempotent. `row_digest` lets a MERGE update a row only when its content
changed, so an unchanged re-run commits no new Delta version.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from kaapana_assets.dicom.columns import instances_fields

TIMESTAMP = pa.timestamp("us", tz="UTC")
FLOATS = pa.list_(pa.float64())
STRINGS = pa.list_(pa.string())
EXCLUDED_COHORTS = pa.list_(pa.struct([("cohort", pa.string()), ("cohort_version", pa.int64())]))
REFERENCE_SOURCES = pa.list_(pa.struct([("label", pa.string()), ("seg_series_uid", pa.string()),
                                        ("seg_sop_instance_uid", pa.string())]))


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    keys: tuple[str, ...]
    # Mutable rows are updated when their row_digest differs; immutable rows are insert-only.
    mutable: bool = False

    def empty(self) -> pa.Table:
        return self.schema.empty_table()


INSTANCES = TableSpec(
    "instances",
    pa.schema(
        # Study/series attributes as each instance carries them (HEADER_COLUMNS): `series` and
        # `studies` are recomputed from these, so they can always be rebuilt from `instances`.
        instances_fields()
        + [
            ("archive_path", pa.string()),
            ("sha256", pa.string()),
            ("size_bytes", pa.int64()),
            ("ingested_at", TIMESTAMP),
        ]
    ),
    keys=("sop_instance_uid",),
)

# `series` and `studies` are computed from `instances` by archive/index.py, which fills exactly
# these columns: each is either computed there or carried over from `instances` by its name.
SERIES = TableSpec(
    "series",
    pa.schema(
        [
            ("series_uid", pa.string()),
            ("study_uid", pa.string()),
            ("patient_id", pa.string()),
            ("modality", pa.string()),
            ("series_number", pa.int64()),
            ("series_description", pa.string()),
            ("body_part", pa.string()),
            ("manufacturer", pa.string()),
            ("manufacturer_model", pa.string()),
            ("institution", pa.string()),
            ("study_date", pa.string()),
            ("sop_class_uid", pa.string()),
            ("instance_count", pa.int64()),
            ("slice_thickness", pa.float64()),
            ("row_spacing", pa.float64()),
            ("column_spacing", pa.float64()),
            ("rows", pa.int64()),
            ("columns", pa.int64()),
            ("orientation", FLOATS),
            ("is_axial", pa.bool_()),
            ("min_instance_number", pa.int64()),
            ("max_instance_number", pa.int64()),
            ("missing_instance_numbers", pa.list_(pa.int64())),
            ("complete", pa.bool_()),
            ("frame_of_reference_uid", pa.string()),
            ("referenced_series_uids", STRINGS),
            ("reference_seg_series_uids", STRINGS),
            ("segment_labels", STRINGS),
            # QIDO-RS answers from these (added after the first release: older tables gain them
            # on their next MERGE, null in rows written before).
            ("series_date", pa.string()),
            ("series_time", pa.string()),
            # Why this series cannot be assembled into a volume as the index sees it (enhanced
            # multi-frame objects, for now); null when nothing is known against it.
            ("volume_issue", pa.string()),
            ("row_digest", pa.string()),
            ("updated_at", TIMESTAMP),
        ]
    ),
    keys=("series_uid",),
    mutable=True,
)

STUDIES = TableSpec(
    "studies",
    pa.schema(
        [
            ("study_uid", pa.string()),
            ("patient_id", pa.string()),
            ("patient_name", pa.string()),
            ("patient_sex", pa.string()),
            ("patient_birth_date", pa.string()),
            ("study_date", pa.string()),
            ("study_description", pa.string()),
            ("accession_number", pa.string()),
            ("institution", pa.string()),
            ("modalities", STRINGS),
            ("series_count", pa.int64()),
            ("instance_count", pa.int64()),
            # QIDO-RS answers from these (added after the first release: older tables gain them
            # on their next MERGE, null in rows written before).
            ("study_time", pa.string()),
            ("study_id", pa.string()),
            ("referring_physician_name", pa.string()),
            ("row_digest", pa.string()),
            ("updated_at", TIMESTAMP),
        ]
    ),
    keys=("study_uid",),
    mutable=True,
)

QUARANTINE = TableSpec(
    "quarantine",
    pa.schema(
        [
            # Content-addressed: the same bad bytes sent twice are one row, one file.
            ("sha256", pa.string()),
            ("reason", pa.string()),
            ("error", pa.string()),
            ("source_path", pa.string()),
            ("quarantine_path", pa.string()),
            ("size_bytes", pa.int64()),
            # Untrusted values as read (may be hostile); stored as data, never used as paths.
            ("study_uid", pa.string()),
            ("sop_instance_uid", pa.string()),
            ("quarantined_at", TIMESTAMP),
        ]
    ),
    keys=("sha256",),
)

# The same SOP Instance seen again in another transfer syntax (a lossless re-encoding):
# DICOM keeps the SOP Instance UID across it. The archive keeps the first encoding.
INSTANCE_ENCODINGS = TableSpec(
    "instance_encodings",
    pa.schema(
        [
            ("sop_instance_uid", pa.string()),
            ("sha256", pa.string()),
            ("transfer_syntax_uid", pa.string()),
            ("size_bytes", pa.int64()),
            ("archived_sha256", pa.string()),
            ("archived_transfer_syntax_uid", pa.string()),
            ("source_path", pa.string()),
            ("seen_at", TIMESTAMP),
        ]
    ),
    keys=("sop_instance_uid", "sha256"),
)

COHORT_MEMBERS = TableSpec(
    "cohort_members",
    pa.schema(
        [
            ("cohort", pa.string()),
            ("cohort_version", pa.int64()),
            ("series_uid", pa.string()),
            ("study_uid", pa.string()),
            ("patient_id", pa.string()),
            # The reference SEG(s) chosen for the series and their labels, as of the snapshot.
            ("reference_seg_series_uids", STRINGS),
            ("reference_labels", STRINGS),
            # Which accepted reference SEG instance each label comes from (cohorts/references.py),
            # and the overlap rule the label maps are painted with: the export and the evaluation
            # read both from the version, never from the definition as it is now.
            ("reference_sources", REFERENCE_SOURCES),
            ("label_priority", STRINGS),
            # What this version is and what it was computed from (Delta time travel).
            ("membership_hash", pa.string()),
            ("definition_hash", pa.string()),
            ("purpose", pa.string()),
            ("series_table_version", pa.int64()),
            ("tags_table_version", pa.int64()),
            # The slices a version exports and the SEGs it took for model outputs: readers
            # time-travel `instances` to this version, so slices that arrive later never
            # change an export of the same version. Null in versions cut before it was recorded.
            ("instances_table_version", pa.int64()),
            ("segmentations_table_version", pa.int64()),
            # filter.exclude_cohorts: each excluded cohort and the version whose patients were left out.
            ("excluded_cohorts", EXCLUDED_COHORTS),
            ("created_at", TIMESTAMP),
            # The research project the cohort belongs to and the `series_projects` version its
            # members were chosen from (its scope, time-travelled). Null in versions cut before
            # projects: the default project, at no pinned version.
            ("project", pa.string()),
            ("series_projects_table_version", pa.int64()),
        ]
    ),
    keys=("cohort", "cohort_version", "series_uid"),
)

# The outcome of each blocking harmonization check on a cohort version, written by the check
# itself: export and training (here, at a federated site, in the client) refuse a version
# with a failed check without asking Dagster. A re-run check replaces its row.
COHORT_CHECKS = TableSpec(
    "cohort_checks",
    pa.schema(
        [
            ("cohort", pa.string()),
            ("cohort_version", pa.int64()),
            ("check_name", pa.string()),
            ("passed", pa.bool_()),
            ("description", pa.string()),
            ("offending_count", pa.int64()),
            ("definition_hash", pa.string()),  # the definition (tolerances) it was checked against
            ("checked_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("cohort", "cohort_version", "check_name"),
    mutable=True,
)

TAGS = TableSpec(
    "tags",
    pa.schema([("series_uid", pa.string()), ("tag", pa.string()), ("tagged_at", TIMESTAMP)]),
    keys=("series_uid", "tag"),
)

SITE_STATISTICS = TableSpec(
    "site_statistics",
    pa.schema(
        [
            ("snapshot_id", pa.string()),
            ("site", pa.string()),
            ("metric", pa.string()),
            ("labels", pa.string()),  # JSON object of label values, "{}" when none
            ("value", pa.float64()),
            ("computed_at", TIMESTAMP),
        ]
    ),
    keys=("snapshot_id", "metric", "labels"),
)

SEGMENTATIONS = TableSpec(
    "segmentations",
    pa.schema(
        [
            ("seg_sop_instance_uid", pa.string()),
            ("label", pa.string()),
            ("label_value", pa.int64()),
            ("study_uid", pa.string()),
            ("series_uid", pa.string()),  # the segmented (source) series
            ("seg_series_uid", pa.string()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("voxel_count", pa.int64()),
            ("volume_ml", pa.float64()),
            ("mean_hu", pa.float64()),
            ("min_hu", pa.float64()),
            ("max_hu", pa.float64()),
            ("bbox", pa.list_(pa.int64())),  # z0, z1, y0, y1, x0, x1 (voxel indices, inclusive)
            ("created_at", TIMESTAMP),
        ]
    ),
    keys=("seg_sop_instance_uid", "label"),
)

# Every segment of every indexed SEG instance, with who made it: what the reference policy
# (cohorts/references.py) decides from. Filled when ingest (and our own SEG write-back)
# reconciles a study; SOP instances are immutable, so rows are insert-only.
SEG_SEGMENTS = TableSpec(
    "seg_segments",
    pa.schema(
        [
            ("sop_instance_uid", pa.string()),  # the SEG instance
            ("segment_number", pa.int64()),
            ("series_uid", pa.string()),  # the SEG's series
            ("study_uid", pa.string()),
            ("segment_label", pa.string()),
            ("algorithm_type", pa.string()),  # SegmentAlgorithmType: MANUAL | SEMIAUTOMATIC | AUTOMATIC
            ("algorithm_name", pa.string()),  # SegmentationAlgorithmIdentificationSequence
            ("algorithm_family", pa.string()),
            ("algorithm_version", pa.string()),
            ("algorithm_source", pa.string()),
            ("manufacturer", pa.string()),
            ("manufacturer_model", pa.string()),
            ("content_creator_name", pa.string()),
            ("content_date", pa.string()),  # DA, as written
            ("content_time", pa.string()),  # TM, as written
            ("indexed_at", TIMESTAMP),
        ]
    ),
    keys=("sop_instance_uid", "segment_number"),
)

SENT = TableSpec(
    "sent",
    pa.schema(
        [
            ("sop_instance_uid", pa.string()),
            ("destination", pa.string()),  # AE_TITLE@host:port
            ("study_uid", pa.string()),
            ("series_uid", pa.string()),
            ("sop_class_uid", pa.string()),
            ("status", pa.string()),  # success | failed
            ("dimse_status", pa.int64()),
            ("attempts", pa.int64()),
            ("error", pa.string()),
            ("sent_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("sop_instance_uid", "destination"),
    mutable=True,
)

FEDERATED_ROUNDS = TableSpec(
    "federated_rounds",
    pa.schema(
        [
            ("experiment", pa.string()),
            ("round", pa.int64()),
            ("site", pa.string()),  # a site name, or "global" for the round's aggregate
            ("status", pa.string()),  # aggregated | rejected | failed | global
            ("reason", pa.string()),  # why a site's update was not aggregated
            ("message", pa.string()),
            ("cases", pa.int64()),  # training cases behind the update
            ("train_loss", pa.float64()),
            ("val_cases", pa.int64()),
            ("dice", pa.float64()),  # the round's global model on this site's validation patients
            ("update_sha256", pa.string()),
            ("global_sha256", pa.string()),
            ("plan_sha256", pa.string()),
            ("strategy", pa.string()),
            # ε the site has spent so far (dp-accounting, at the experiment's δ), this round
            # included; the global row: the largest. Null without differential privacy.
            ("epsilon", pa.float64()),
            ("committed_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("experiment", "round", "site"),
    mutable=True,  # a retried round replaces its failed attempt (Delta history keeps both)
)

# A site's own record of the rounds it trained in (written at the site, in the site's lake;
# never sent): which cohort version its local update was trained on. The held-out check of
# an evaluation at this site reads it for a federated model.
FEDERATED_SITE_ROUNDS = TableSpec(
    "federated_site_rounds",
    pa.schema(
        [
            ("experiment", pa.string()),
            ("round", pa.int64()),
            ("site", pa.string()),
            ("cohort", pa.string()),
            ("cohort_version", pa.int64()),
            ("cases", pa.int64()),  # training cases of the local update
            ("trained_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("experiment", "round", "site"),
    mutable=True,  # a retried round replaces its row
)

# A federated model measured at every site on the site's own held-out cohort (hub; from
# the aggregates the sites sent, federated/site_evaluation.py): one row per site, label and
# metric. A label and metric measured on fewer cases than the threshold is suppressed:
# `cases` and every statistic null, `reported` "<5".
FEDERATED_EVALUATIONS = TableSpec(
    "federated_evaluations",
    pa.schema(
        [
            ("experiment", pa.string()),
            ("model", pa.string()),  # "experiment:global@roundN", the model version evaluated
            ("round", pa.int64()),  # the global model's round
            ("site", pa.string()),
            ("cohort", pa.string()),  # the site's held-out cohort (its own version of it)
            ("cohort_version", pa.int64()),
            ("label", pa.string()),
            ("metric", pa.string()),  # dice | hd95_mm | assd_mm | reference_ml | predicted_ml | volume_difference_ml
            ("cases", pa.int64()),
            ("reported", pa.string()),  # the case count as published: "12", or "<5" when suppressed
            ("mean", pa.float64()),
            ("median", pa.float64()),
            ("q1", pa.float64()),
            ("q3", pa.float64()),
            ("whislo", pa.float64()),
            ("whishi", pa.float64()),
            ("minimum", pa.float64()),
            ("maximum", pa.float64()),
            ("suppressed", pa.bool_()),
            ("evaluated_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("experiment", "model", "site", "label", "metric"),
    mutable=True,  # evaluating the same model again replaces its rows
)

# The cross-site matrix (hub): every site's local baseline and the global model, each
# evaluated by every site on its own held-out cohort (data_site × model_owner), the mean
# of a metric over the cases; null with `reported` "<5" below the small-cell threshold.
CROSS_SITE_EVALUATIONS = TableSpec(
    "cross_site_evaluations",
    pa.schema(
        [
            ("experiment", pa.string()),
            ("data_site", pa.string()),
            ("model_owner", pa.string()),  # a site (its local baseline) or "global"
            ("label", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("cases", pa.int64()),
            ("reported", pa.string()),
            ("suppressed", pa.bool_()),
            ("evaluated_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("experiment", "data_site", "model_owner", "label", "metric"),
    mutable=True,
)

# A model version measured on a cohort version against its reference SEGs: one row per case
# (series) and label. Recomputing an evaluation updates its rows (Delta history keeps both).
EVALUATIONS = TableSpec(
    "evaluations",
    pa.schema(
        [
            ("evaluation_id", pa.string()),  # sha256(cohort, cohort_version, model_name, model_version)[:16]
            ("cohort", pa.string()),
            ("cohort_version", pa.int64()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("series_uid", pa.string()),  # the case: the cohort member (CT series)
            ("study_uid", pa.string()),
            ("patient_id", pa.string()),
            ("label", pa.string()),
            ("label_value", pa.int64()),
            ("reference_seg_series_uid", pa.string()),
            ("predicted_seg_series_uid", pa.string()),
            ("predicted_seg_sop_instance_uid", pa.string()),
            ("dice", pa.float64()),  # null when reference and prediction are both empty
            ("hd95_mm", pa.float64()),  # null when either is empty (no surface to measure from)
            ("hausdorff_mm", pa.float64()),
            ("assd_mm", pa.float64()),
            ("reference_voxels", pa.int64()),
            ("predicted_voxels", pa.int64()),
            ("reference_ml", pa.float64()),
            ("predicted_ml", pa.float64()),
            ("volume_difference_ml", pa.float64()),  # predicted − reference
            ("spacing_zyx", FLOATS),  # mm
            ("series_table_version", pa.int64()),  # the series rows the cohort version read
            ("evaluated_at", TIMESTAMP),
            ("row_digest", pa.string()),
        ]
    ),
    keys=("cohort", "cohort_version", "model_name", "model_version", "series_uid", "label"),
    mutable=True,
)

# The hub's network monitor: every site's aggregates as each collection received them
# (small cells suppressed at the site), a stale site's last known figures, and the network
# total (site "network"). One row per collection, site and cell; insert-only.
NETWORK_STATISTICS = TableSpec(
    "network_statistics",
    pa.schema(
        [
            ("snapshot_id", pa.string()),  # the collection (its request number)
            ("collected_at", TIMESTAMP),
            ("site", pa.string()),  # a site name, or "network" for the total
            ("status", pa.string()),  # fresh | stale | total
            ("figures_at", TIMESTAMP),  # when the site computed these figures
            ("metric", pa.string()),  # patients | studies | series | instances | quarantined | cohort_*
            ("dimension", pa.string()),  # all | modality | manufacturer | body_part | sex | age | ...
            ("category", pa.string()),
            ("count", pa.int64()),  # null when suppressed; network: the exact total, null when a site withheld it
            ("suppressed", pa.bool_()),
            ("reported", pa.string()),  # as sent: "12", "<5", ">=5"; network: "36", or ">=38" (a lower bound)
            ("suppressed_sites", pa.int64()),  # network: sites whose cell was suppressed
            ("threshold", pa.int64()),  # small-cell threshold the site applied
            ("project", pa.string()),  # the research project counted; null: whole sites
        ]
    ),
    keys=("snapshot_id", "site", "metric", "dimension", "category"),
)

# One row per collection and site: answered (fresh), not answered (stale: last known figures
# reported, or unavailable: none known), and why.
NETWORK_SITES = TableSpec(
    "network_sites",
    pa.schema(
        [
            ("snapshot_id", pa.string()),
            ("collected_at", TIMESTAMP),
            ("site", pa.string()),
            ("status", pa.string()),  # fresh | stale | unavailable
            ("reason", pa.string()),  # why a site's answer is missing or was refused
            ("message", pa.string()),
            ("figures_at", TIMESTAMP),
            ("last_ingest_at", TIMESTAMP),
            ("threshold", pa.int64()),
            ("cells", pa.int64()),
            ("suppressed_cells", pa.int64()),
            ("project", pa.string()),  # the research project counted; null: whole sites
        ]
    ),
    keys=("snapshot_id", "site"),
)

# Research projects (Kaapana's data separation): which projects exist, and which series belong
# to which project. A series may belong to several projects (shared explicitly); a user only
# ever reads the series of their projects. Membership changes are logged in `project_changes`.
PROJECTS = TableSpec(
    "projects",
    pa.schema(
        [
            ("project", pa.string()),  # lower-case name: "lung", "liver"; Kaapana's AE title is KP-<PROJECT>
            ("title", pa.string()),
            ("description", pa.string()),
            ("created_at", TIMESTAMP),
            ("row_digest", pa.string()),
            ("updated_at", TIMESTAMP),
        ]
    ),
    keys=("project",),
    mutable=True,
)

SERIES_PROJECTS = TableSpec(
    "series_projects",
    pa.schema(
        [
            ("series_uid", pa.string()),
            ("study_uid", pa.string()),
            ("project", pa.string()),
            ("assigned_by", pa.string()),  # called-ae | spool-folder | stow-path | default | operator
            ("assigned_at", TIMESTAMP),
        ]
    ),
    keys=("series_uid", "project"),
)

# One row per explicit move or share of series between projects (`kaapana project add-series /
# remove-series`): who, what, when and why. Insert-only.
PROJECT_CHANGES = TableSpec(
    "project_changes",
    pa.schema(
        [
            ("change_id", pa.string()),
            ("series_uid", pa.string()),
            ("project", pa.string()),
            ("action", pa.string()),  # add | remove
            ("operator", pa.string()),
            ("reason", pa.string()),
            ("changed_at", TIMESTAMP),
        ]
    ),
    keys=("change_id", "series_uid", "project"),
)

# The audit trail (kaapana_assets/access/audit.py): one row per authenticated access to patient
# data, appended in batches. Insert-only.
AUDIT = TableSpec(
    "audit",
    pa.schema(
        [
            ("event_id", pa.string()),
            ("user", pa.string()),
            ("roles", STRINGS),
            ("projects", STRINGS),  # the user's projects when the access was made
            ("project", pa.string()),  # the project the access was for, when one is named (a run's)
            ("action", pa.string()),  # search | retrieve | client-read | run-launch
            ("via", pa.string()),  # dicomweb | client | gateway
            ("study_uid", pa.string()),
            ("series_uid", pa.string()),
            ("sop_instance_uid", pa.string()),
            ("target", pa.string()),  # a run's job and partition
            ("at", TIMESTAMP),
        ]
    ),
    keys=("event_id",),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (INSTANCES, SERIES, STUDIES, QUARANTINE, INSTANCE_ENCODINGS, COHORT_MEMBERS, TAGS, SITE_STATISTICS, SEGMENTATIONS, SEG_SEGMENTS, SENT,
                 FEDERATED_ROUNDS, EVALUATIONS, NETWORK_STATISTICS, NETWORK_SITES, COHORT_CHECKS,
                 FEDERATED_SITE_ROUNDS, PROJECTS, SERIES_PROJECTS, PROJECT_CHANGES, AUDIT, FEDERATED_EVALUATIONS,
                 CROSS_SITE_EVALUATIONS)
}


def table_named(name: str) -> TableSpec:
    """The table a name from outside (a CLI argument, a URL, a metadata key) names."""
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown lake table {name!r}; known: {', '.join(sorted(TABLES))}") from None

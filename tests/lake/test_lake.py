"""Delta helpers: idempotent MERGEs, no duplicate keys, exact time travel."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE, SERIES, STUDIES, TABLES, table_named


def _quarantine_rows(*shas: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"sha256": s, "reason": "not_dicom", "error": "x", "size_bytes": 1} for s in shas], schema=QUARANTINE.schema
    )


def test_merge_is_idempotent_and_deduplicates(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    assert lake.version(QUARANTINE) is None and lake.read(QUARANTINE).height == 0
    first = lake.merge(QUARANTINE, _quarantine_rows("a", "b", "a"))
    assert first.inserted == 2 and lake.read(QUARANTINE).height == 2
    again = lake.merge(QUARANTINE, _quarantine_rows("a", "b"))
    assert again.inserted == 0 and again.version == first.version


def test_a_table_named_from_outside_resolves_to_its_spec_or_a_clear_error() -> None:
    assert table_named("series") is SERIES
    assert all(table_named(name) is spec for name, spec in TABLES.items())
    with pytest.raises(ValueError, match=r"unknown lake table 'serie'; known: .*\bseries\b.*\bstudies\b"):
        table_named("serie")


def test_mutable_rows_update_only_when_changed(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")

    def rows(count: int) -> pa.Table:
        return pa.Table.from_pylist(
            [{"study_uid": "1.2", "series_count": count, "row_digest": f"d{count}"}], schema=STUDIES.schema
        )

    v1 = lake.merge(STUDIES, rows(1)).version
    same = lake.merge(STUDIES, rows(1))
    assert same.version == v1 and same.updated == 0
    changed = lake.merge(STUDIES, rows(2))
    assert changed.updated == 1 and changed.version == v1 + 1  # type: ignore[operator]
    # Time travel: the old version still reads as it was.
    assert lake.read(STUDIES, version=v1)["series_count"].to_list() == [1]
    assert lake.read(STUDIES)["series_count"].to_list() == [2]


def test_maintenance_compacts_and_keeps_cohort_time_travel(tmp_path: Path, corpus) -> None:  # type: ignore[no-untyped-def]
    """Per-study commits leave small files; maintenance compacts and vacuums them, and a
    cohort version cut before later ingests still reads back exactly (the vacuum's
    retention reaches back to the series version the cohort read), even with no minimum."""
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.cohorts.membership import read_cohort, snapshot_cohort
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.lake.maintenance import maintain_lake, protected_versions
    from tests.helpers import COHORT

    home = KaapanaHome(tmp_path / "home").ensure()
    studies = corpus["site-a"] + corpus["site-b"]
    for study in studies[:3]:  # one commit per study, as the sensor's runs do
        ingest_files(study.files, Archive.for_home(home), remove_sources=False)
    lake = Lake(home.lake)
    cohort = snapshot_cohort(lake, COHORT)
    for study in studies[3:]:  # the index moves on after the cohort was cut
        ingest_files(study.files, Archive.for_home(home), remove_sources=False)
    assert lake.version(SERIES) > cohort.series_table_version
    before = read_cohort(lake, COHORT.name, cohort.version).members

    reports = {r.table: r for r in maintain_lake(lake, [INSTANCES, SERIES, STUDIES], minimum_retention_hours=0)}
    assert protected_versions(lake)["series"] == cohort.series_table_version
    instances = reports["instances"]
    assert instances.files_before > 1 and instances.files_after == 1  # compacted to one file
    # The cohort version pins its slices: the instances files its version reads are kept ...
    assert instances.protected_version == cohort.instances_table_version
    pinned = lake.read(INSTANCES, version=cohort.instances_table_version)
    assert pinned.height == sum(len(s.files) for s in studies[:3])
    # ... while an unprotected table's removed files go.
    assert reports["studies"].files_on_disk_after < reports["studies"].files_on_disk_before
    assert reports["studies"].vacuumed > 0
    assert reports["series"].protected_version == cohort.series_table_version
    after = read_cohort(lake, COHORT.name, cohort.version).members
    assert after.drop("created_at").equals(before.drop("created_at"))
    assert lake.read(INSTANCES).height == sum(len(s.files) for s in studies)


def test_maintenance_asset_reports_file_counts(tmp_path: Path) -> None:
    import dagster as dg

    from kaapana_assets.lake.assets import lake_maintenance
    from resources.storage import LakeResource

    lake = Lake(tmp_path / "lake")
    for i in range(5):  # five commits, five small files
        lake.merge(QUARANTINE, _quarantine_rows(f"{i:064x}"))
    result = dg.materialize([lake_maintenance], resources={"lake": LakeResource(uri=str(tmp_path / "lake"))},
                            run_config={"ops": {"lake_maintenance": {"config": {"minimum_retention_hours": 0}}}})
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["files_before"].value == 5 and metadata["files_after"].value == 1
    assert lake.read(QUARANTINE).height == 5


def test_merge_evolves_a_table_written_before_columns_were_added(tmp_path: Path) -> None:
    """A lake written by a release without the QIDO columns (studies.study_time, study_id,
    referring_physician_name; instances' header columns of the same release) is read, and
    merged into: the table gains the columns, its old rows read them as null."""
    from deltalake import write_deltalake

    from kaapana_assets.lake.schemas import INSTANCES

    lake = Lake(tmp_path / "lake")
    added = {"study_time", "study_id", "referring_physician_name", "series_date", "series_time", "bits_allocated"}
    for spec, old_row, new_row in (
        (STUDIES, {"study_uid": "1.2", "series_count": 1, "row_digest": "d1"},
         {"study_uid": "1.3", "series_count": 1, "study_time": "093000", "study_id": "7", "row_digest": "d2"}),
        (INSTANCES, {"sop_instance_uid": "1.2.1", "study_uid": "1.2", "modality": "CT"},
         {"sop_instance_uid": "1.3.1", "study_uid": "1.3", "modality": "CT", "study_time": "093000",
          "bits_allocated": 16}),
    ):
        old_schema = pa.schema([f for f in spec.schema if f.name not in added])
        assert len(old_schema) < len(spec.schema)
        write_deltalake(lake.uri(spec), pa.Table.from_pylist([old_row], schema=old_schema))
        assert set(lake.read(spec).columns) == set(old_schema.names)  # read as it is

        lake.merge(spec, pa.Table.from_pylist([new_row], schema=spec.schema))
        rows = {r[spec.keys[0]]: r for r in lake.read(spec).to_dicts()}
        assert set(lake.read(spec).columns) == set(spec.schema.names)
        assert rows[old_row[spec.keys[0]]]["study_time"] is None
        assert rows[new_row[spec.keys[0]]]["study_time"] == "093000"


def test_a_lake_that_wrote_still_pickles_for_worker_processes(tmp_path: Path) -> None:
    """The lake keeps its tables' handles between writes; a copy in another process opens its own."""
    import pickle

    lake = Lake(tmp_path / "lake")
    lake.merge(QUARANTINE, _quarantine_rows("a"))
    copy = pickle.loads(pickle.dumps(lake))
    assert copy.merge(QUARANTINE, _quarantine_rows("a", "b")).inserted == 1
    assert lake.merge(QUARANTINE, _quarantine_rows("c")).version == 3  # brought up to date first
    assert sorted(lake.read(QUARANTINE)["sha256"].to_list()) == ["a", "b", "c"]

"""The lake on a real S3 API (moto's server on loopback): every table, concurrent writers
from several processes, and the refusal of a store that ignores conditional writes."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from deltalake.exceptions import CommitFailedError

from bench.s3_server import IgnoringConditionalWrites, S3Server
from kaapana_assets.lake import Lake
from kaapana_assets.lake import tables as lake_tables
from kaapana_assets.lake.schemas import INSTANCES, SEGMENTATIONS, SERIES, STUDIES, TABLES, TableSpec
from kaapana_assets.lake.store import UnsafeStoreError
from kaapana_assets.lake.tables import CommitConflictError

WRITERS, BATCHES, ROWS = 4, 2, 5


def _key_row(spec: TableSpec, n: int) -> dict[str, object]:
    """A row with only its key columns set, each from `n`."""
    values = {pa.string(): f"1.2.{n}", pa.int64(): n, pa.int32(): n}
    row: dict[str, object] = {}
    for key in spec.keys:
        kind = spec.schema.field(key).type
        row[key] = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=n) \
            if pa.types.is_timestamp(kind) else values[kind]
    return row


def test_every_table_commits_and_time_travels_on_s3(s3_server: S3Server) -> None:
    lake = s3_server.lake()
    for spec in TABLES.values():
        assert lake.merge(spec, pa.Table.from_pylist([_key_row(spec, 1)], schema=spec.schema)).inserted == 1, spec.name
        assert lake.read(spec).height == 1 and lake.read(spec, version=0).height == 0, spec.name  # 0: created empty
    assert lake.versions() == {name: 1 for name in TABLES}


def _write(prefix: str, endpoint: str, writer: int) -> None:
    """One writer process: BATCHES MERGEs into instances, series and segmentations each."""
    lake = Lake(prefix, S3Server.options_for(endpoint))
    for batch in range(BATCHES):
        base = (writer * BATCHES + batch) * ROWS
        rows = range(base, base + ROWS)
        lake.merge(INSTANCES, pa.Table.from_pylist([{"sop_instance_uid": f"1.2.{n}", "series_uid": f"1.3.{writer}"}
                                                    for n in rows], schema=INSTANCES.schema))
        lake.merge(SERIES, pa.Table.from_pylist([{"series_uid": f"1.3.{n}", "row_digest": str(n)} for n in rows],
                                                schema=SERIES.schema))
        lake.merge(SEGMENTATIONS, pa.Table.from_pylist([{"seg_sop_instance_uid": f"1.4.{n}", "label": "liver"}
                                                        for n in rows], schema=SEGMENTATIONS.schema))


def test_concurrent_writers_lose_no_commit(s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    """Four processes MERGE into the same three tables at once, as parallel runs on several
    pods do: afterwards every row of every writer is there."""
    lake = s3_server.lake()
    spawn = multiprocessing.get_context("spawn")
    writers = [spawn.Process(target=_write, args=(lake.root, s3_server.endpoint, w)) for w in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [p.exitcode for p in writers] == [0] * WRITERS
    expected = WRITERS * BATCHES * ROWS
    for spec, column, prefix in ((INSTANCES, "sop_instance_uid", "1.2."), (SERIES, "series_uid", "1.3."),
                                 (SEGMENTATIONS, "seg_sop_instance_uid", "1.4.")):
        assert sorted(lake.read(spec)[column].to_list()) == sorted(f"{prefix}{n}" for n in range(expected))
        # One commit per MERGE: none overwrote another.
        assert lake.version(spec) == WRITERS * BATCHES, spec.name


def test_racing_writers_create_a_table_once(s3_server: S3Server, tmp_path: Path) -> None:
    """Six writers open a table that does not exist yet, at the same moment, on S3 and on a
    folder: one CREATE TABLE at version 0, none re-committed as version 1 (a version the
    writes did not make, which materializations would record)."""
    for attempt in range(5):
        for root, options in ((s3_server.lake().root, s3_server.options()), (str(tmp_path / str(attempt)), None)):
            start = threading.Barrier(6)
            failures: list[BaseException] = []

            def create(root: str = root, options: dict[str, str] | None = options,
                       start: threading.Barrier = start, failures: list[BaseException] = failures) -> None:
                lake = Lake(root, options)
                lake.check_writable()
                start.wait()
                try:
                    lake.delta(INSTANCES)
                except BaseException as exc:  # noqa: BLE001  (reported below, with the store)
                    failures.append(exc)

            threads = [threading.Thread(target=create) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert failures == [], root
            assert Lake(root, options).version(INSTANCES) == 0, root


def test_a_store_ignoring_conditional_writes_is_refused_unless_allowed(s3_server: S3Server) -> None:
    """Behind a proxy that drops If-None-Match, a second put-if-absent succeeds: the lake
    refuses to write and names the store; with the operator's opt-out it writes."""
    proxy = IgnoringConditionalWrites(s3_server)
    try:
        rows = pa.Table.from_pylist([_key_row(INSTANCES, 1)], schema=INSTANCES.schema)
        lake = s3_server.lake(endpoint=proxy.endpoint)
        with pytest.raises(UnsafeStoreError, match=rf"{lake.root} at {proxy.endpoint} ignores conditional writes"
                                                   r".*KAAPANA_LAKE_UNSAFE_STORE=allow"):
            lake.merge(INSTANCES, rows)
        assert not lake.exists(INSTANCES)  # refused before anything was written
        allowed = s3_server.lake(lake.root.rsplit("/", 1)[1], endpoint=proxy.endpoint, unsafe_store_allowed=True)
        assert allowed.merge(INSTANCES, rows).inserted == 1
        assert allowed.read(INSTANCES)["sop_instance_uid"].to_list() == ["1.2.1"]
    finally:
        proxy.close()


def test_commit_retries_are_bounded_logged_and_end_in_a_clear_error(
        s3_server: S3Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lake_tables, "BACKOFF_S", 0.001)
    lake = s3_server.lake()
    attempts: list[float] = []

    def always_losing() -> None:  # a writer that loses every race
        attempts.append(time.monotonic())
        raise CommitFailedError("Commit failed: a concurrent transactions added new data")

    with caplog.at_level("WARNING", logger=lake_tables.__name__), \
            pytest.raises(CommitConflictError, match=rf"MERGE into {lake.root}/series lost against concurrent "
                                                     r"writers 8 times; last conflict: Commit failed"):
        lake._committed(SERIES, "MERGE", always_losing)
    assert len(attempts) == lake_tables.MAX_COMMIT_ATTEMPTS == 8
    assert [r.getMessage().split(" (")[1].split(")")[0] for r in caplog.records] == [
        f"attempt {n} of 8" for n in range(1, 8)]


def test_a_site_on_s3_ingests_cuts_a_cohort_vacuums_and_reads_back(
        s3_server: S3Server, corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Ingest → cohort → more ingest → maintenance with vacuum → the client and lineage,
    every table on the S3 server (the archive's files in the home's folder)."""
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.client import Kaapana
    from kaapana_assets.cohorts.membership import read_cohort, snapshot_cohort
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.lake.maintenance import maintain_lake
    from tests.helpers import COHORT

    prefix = uuid.uuid4().hex
    home, lake = KaapanaHome(tmp_path / "home").ensure(), s3_server.lake(prefix)
    studies = corpus["site-a"]
    ingest_files([f for s in studies[:2] for f in s.files], Archive.for_home(home, lake), remove_sources=False)
    cohort = snapshot_cohort(lake, COHORT)
    ingest_files([f for s in studies[2:] for f in s.files], Archive.for_home(home, lake), remove_sources=False)
    assert lake.version(SERIES) > cohort.series_table_version  # type: ignore[operator]
    assert not any(home.lake.iterdir())  # nothing of the lake on local disk

    reports = {r.table: r for r in maintain_lake(lake, [INSTANCES, SERIES, STUDIES], minimum_retention_hours=0)}
    assert reports["instances"].files_after == 1  # compacted (and vacuumed) on the object store
    assert read_cohort(lake, COHORT.name, cohort.version).members.equals(cohort.members)  # time travel survives

    seg_uid = "1.2.826.0.1.3680043.10.999.1"
    segmented = cohort.members["series_uid"][0]
    lake.merge(SEGMENTATIONS, pa.Table.from_pylist(
        [{"seg_sop_instance_uid": seg_uid, "label": "liver", "series_uid": segmented, "seg_series_uid": seg_uid + ".1",
          "study_uid": cohort.members["study_uid"][0], "model_name": "nnunet-liver", "model_version": "1"}],
        schema=SEGMENTATIONS.schema))
    for key, value in s3_server.environment(prefix).items():
        monkeypatch.setenv(key, value)
    client = Kaapana(home.root)  # reads KAAPANA_LAKE_URI and the S3 settings, as a notebook does
    assert client.lake.root == lake.root
    versions = client.cohorts()
    assert versions.filter(pl.col("cohort") == COHORT.name)["cohort_version"].to_list() == [cohort.version]
    lineage = client.lineage(seg_uid)
    assert f"SEG {seg_uid}" in lineage and f"series {segmented}" in lineage

"""Ingestion through the real pipeline into real Delta tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaapana_assets.archive.service import Archive
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.headers import Reason
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake.schemas import INSTANCES, QUARANTINE, SERIES, STUDIES
from tests.helpers import dicom_files, pydicom_files


def test_rows_match_files_and_reingest_adds_nothing(targets: Archive, spool_copy: Path, corpus: dict) -> None:
    files = dicom_files(spool_copy)
    report = ingest_files(files, targets, remove_sources=False)
    studies = [s for site in corpus.values() for s in site]
    assert report.summary() == {"indexed": len(files), "already_indexed": 0, "quarantined": 0, "failed": 0}
    lake = targets.lake
    assert lake.read(INSTANCES).height == len(files)
    assert lake.read(STUDIES).height == len(studies)
    assert lake.read(SERIES).height == 2 * len(studies)  # CT + reference SEG each
    # Every series in the default project: nothing named another.
    assert report.inserted == {"instances": len(files), "series": 2 * len(studies), "studies": len(studies),
                               "series_projects": 2 * len(studies)}
    assert all(isinstance(v, int) for k, v in report.versions.items() if k != "quarantine")
    for f in files:  # archived byte for byte
        row = lake.read(INSTANCES, pl.col("sha256") == report.files[files.index(f)].sha256)
        assert (targets.root / row["archive_path"][0]).read_bytes() == f.read_bytes()

    again = ingest_files(files, targets, remove_sources=False)
    assert again.summary()["already_indexed"] == len(files)
    assert again.inserted == {} and again.updated == {}
    assert again.versions == report.versions  # nothing committed
    assert lake.read(INSTANCES).height == len(files)


def test_series_and_study_fields(targets: Archive, spool_copy: Path, corpus: dict) -> None:
    ingest_files(dicom_files(spool_copy), targets)
    study = corpus["site-b"][1]
    series = targets.lake.read(SERIES, pl.col("study_uid") == study.study_uid)
    ct = series.filter(pl.col("modality") == "CT").row(0, named=True)
    seg = series.filter(pl.col("modality") == "SEG").row(0, named=True)
    assert ct["instance_count"] == len(study.ct_files)
    assert ct["complete"] and ct["missing_instance_numbers"] == [] and ct["is_axial"]
    assert ct["manufacturer"] == "GE MEDICAL SYSTEMS" and ct["body_part"] == "ABDOMEN"
    assert ct["slice_thickness"] > 0 and ct["row_spacing"] > 0 and ct["rows"] == 40
    assert ct["reference_seg_series_uids"] == [study.seg_series_uid]
    assert seg["referenced_series_uids"] == [study.series_uid]
    assert seg["segment_labels"] == sorted(study.labels_present)
    row = targets.lake.read(STUDIES, pl.col("study_uid") == study.study_uid).row(0, named=True)
    assert row["modalities"] == ["CT", "SEG"] and row["series_count"] == 2
    assert row["instance_count"] == len(study.files) and row["patient_id"] == study.patient_id


def test_partial_study_then_rest(targets: Archive, spool_copy: Path, corpus: dict) -> None:
    """A study resent with more instances adds only those, and the series becomes complete."""
    study = corpus["site-a"][0]
    root = spool_copy / "site-a" / study.ct_files[0].parents[1].name / "ct"
    files = sorted(root.iterdir())
    first, rest = files[:3] + files[5:], files[3:5]
    ingest_files(first, targets)
    series = targets.lake.read(SERIES, pl.col("series_uid") == study.series_uid).row(0, named=True)
    assert not series["complete"] and series["missing_instance_numbers"] == [4, 5]
    report = ingest_files(first + rest, targets, remove_sources=False)  # `first` already left the spool
    assert report.count("indexed") == 2
    series = targets.lake.read(SERIES, pl.col("series_uid") == study.series_uid).row(0, named=True)
    assert series["complete"] and series["instance_count"] == len(files)


def test_sources_leave_the_spool_only_when_committed(targets: Archive, spool_copy: Path) -> None:
    files = dicom_files(spool_copy)
    junk = spool_copy / "junk.bin"
    junk.write_bytes(b"not dicom at all")
    report = ingest_files([*files, junk], targets)
    assert not any(Path(f).exists() for f in files) and not junk.exists()
    q = targets.lake.read(QUARANTINE)
    assert q.height == 1 and q["reason"][0] == Reason.NOT_DICOM
    assert Path(q["quarantine_path"][0]).read_bytes() == b"not dicom at all"
    assert report.count("quarantined") == 1


def test_sop_conflict_is_quarantined_not_overwritten(targets: Archive, spool_copy: Path, tmp_path: Path) -> None:
    original = dicom_files(spool_copy)[0]
    ingest_files([original], targets, remove_sources=False)
    ds = pydicom.dcmread(original)
    ds.PatientName = "Changed^Name"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    report = ingest_files([changed], targets)
    assert report.files[0].status == "quarantined" and report.files[0].reason == Reason.SOP_CONFLICT
    row = targets.lake.read(INSTANCES, pl.col("sop_instance_uid") == ds.SOPInstanceUID).row(0, named=True)
    assert (targets.root / row["archive_path"]).read_bytes() == original.read_bytes()


def test_hostile_uid_stays_inside_the_lake(home: KaapanaHome, targets: Archive, spool_copy: Path, tmp_path: Path) -> None:
    source = dicom_files(spool_copy)[0]
    hostile = []
    for i, uid in enumerate(["../../etc", "1.2/../../../escape", "/etc/passwd"]):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = uid
        ds.SOPInstanceUID = f"1.2.3.{i + 1}"
        path = tmp_path / f"hostile{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        hostile.append(path)
    before = {p for p in tmp_path.parent.rglob("*")} - {p for p in home.root.rglob("*")}
    report = ingest_files(hostile, targets)
    assert [f.reason for f in report.files] == [Reason.INVALID_UID] * 3
    after = {p for p in tmp_path.parent.rglob("*")} - {p for p in home.root.rglob("*")}
    assert after - before == set()  # nothing new outside KAAPANA_HOME
    assert not list(targets.root.rglob("*.dcm"))
    q = targets.lake.read(QUARANTINE)
    assert sorted(q["study_uid"].to_list()) == sorted(["../../etc", "1.2/../../../escape", "/etc/passwd"])


def test_pydicom_corpus_indexed_or_quarantined(targets: Archive, tmp_path: Path) -> None:
    """Every file shipped in pydicom's data folder (some deliberately broken) ends up
    indexed or quarantined with a reason; no exception escapes."""
    sources = pydicom_files()
    spool = tmp_path / "pd"
    copies = []
    for i, src in enumerate(sources):
        target = spool / f"{i:04d}_{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        copies.append(target)
    report = ingest_files(copies, targets)
    s = report.summary()
    assert s["failed"] == 0
    assert len(copies) == s["indexed"] + s["already_indexed"] + s["quarantined"]
    assert s["indexed"] > 50 and s["quarantined"] > 10
    assert all(f.reason and f.error for f in report.files if f.status == "quarantined")
    assert not any(p.exists() for p in copies)  # every file accounted for, none left behind
    q = targets.lake.read(QUARANTINE)
    distinct_bad = len({f.sha256 for f in report.files if f.status == "quarantined"})
    assert q.height == distinct_bad
    assert {Reason.NOT_DICOM, Reason.TRUNCATED} <= set(q["reason"].to_list())
    assert targets.lake.read(INSTANCES).height == s["indexed"]


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from kaapana_assets.synthetic import generate_site

    study = generate_site("site-a", 1, seed=9, out=tmp_path_factory.mktemp("fz"), slices=4, matrix=16)[0]
    return study.ct_files[1].read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutations=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, 1500)), st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 255)), max_size=6)),
        min_size=1, max_size=4,
    )
)
def test_fuzzed_files_are_indexed_or_quarantined(fuzz_seed: bytes, tmp_path_factory: pytest.TempPathFactory, mutations) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("fuzzrun")
    targets = Archive.for_home(KaapanaHome(work / "home"))
    paths = []
    for i, (cut, flips) in enumerate(mutations):
        data = bytearray(fuzz_seed)
        for position, value in flips:
            data[position % len(data)] = value
        path = work / f"f{i}.dcm"
        path.write_bytes(bytes(data[:cut] if cut is not None else data))
        paths.append(path)
    report = ingest_files(paths, targets)
    s = report.summary()
    assert s["failed"] == 0 and len(paths) == s["indexed"] + s["already_indexed"] + s["quarantined"]
    assert not any(p.exists() for p in paths)


def _without_times(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return frame.drop([c for c in ("ingested_at", "updated_at") if c in frame.columns]).sort(key)


def test_small_batches_and_reconciles_equal_one_batch(tmp_path: Path, spool_copy: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Instances commit per batch, series/studies every RECONCILE_EVERY instances: the tables
    end up as one big batch makes them, and each source leaves the spool only once its
    study's series and study rows are committed."""
    from kaapana_assets.ingest import pipeline

    files = dicom_files(spool_copy)
    whole = Archive.for_home(KaapanaHome(tmp_path / "whole"))
    ingest_files(files, whole, remove_sources=False, batch_size=10_000)

    monkeypatch.setattr(pipeline, "RECONCILE_EVERY", 7)
    batched = Archive.for_home(KaapanaHome(tmp_path / "batched"))
    reconciled: list[int] = []
    real = pipeline._reconcile

    def spy(lake, results, report):  # type: ignore[no-untyped-def]
        # Nothing of these files has left the spool before their series are committed.
        assert all(Path(r.source).exists() for r in results)
        reconciled.append(len(results))
        real(lake, results, report)

    monkeypatch.setattr(pipeline, "_reconcile", spy)
    report = ingest_files(files, batched, batch_size=3)
    assert sum(reconciled) == len(files) and len(reconciled) > 2
    assert report.count("indexed") == len(files) and not any(Path(f).exists() for f in files)
    for table, key in ((INSTANCES, "sop_instance_uid"), (SERIES, "series_uid"), (STUDIES, "study_uid")):
        assert _without_times(batched.lake.read(table), key).equals(_without_times(whole.lake.read(table), key)), \
            table.name


def test_series_conflict_across_batches_of_one_ingest(tmp_path: Path, targets: Archive,
                                                      spool_copy: Path) -> None:
    """The second study's file comes in a later batch, before any series row exists."""
    original = dicom_files(spool_copy)[0]
    first, second = tmp_path / "a" / "1.dcm", tmp_path / "b" / "2.dcm"
    for path, study in ((first, None), (second, "1.2.826.0.1.3680043.10.5.7")):
        ds = pydicom.dcmread(original)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.2.")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if study:
            ds.StudyInstanceUID = study
        path.parent.mkdir(parents=True)
        ds.save_as(path, enforce_file_format=True)
    report = ingest_files([first, second], targets, remove_sources=False, batch_size=1, workers=1)
    assert report.reasons == {Reason.SERIES_CONFLICT: 1}
    series = targets.lake.read(SERIES)
    assert series.height == 1 and series["instance_count"][0] == 1


def test_rows_to_arrow_fast_path_equals_from_pylist(spool_copy: Path) -> None:
    import datetime as dt

    import pyarrow as pa

    from kaapana_assets.archive import index
    from kaapana_assets.ingest.headers import parse_header
    from kaapana_assets.lake.schemas import INSTANCES, SERIES, STUDIES

    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    rows = []
    for f in dicom_files(spool_copy):
        data = f.read_bytes()
        rows.append(dict(parse_header(data).as_dict(), archive_path="x/y.dcm", sha256="0" * 64,
                         size_bytes=len(data), ingested_at=now))
    series = index.series_rows(rows, now)
    studies = index.study_rows(rows, series, now)
    odd = dict(rows[0], patient_name='quote " newline \n nul \x00 ü', slice_thickness=2, rows=2**62,
               image_position=[1, -0.0, 1e-300])
    for table, schema in ((rows + [odd], INSTANCES.schema), (series, SERIES.schema), (studies, STUDIES.schema)):
        got = index.to_table(table, schema)
        assert got.schema == schema
        assert got.equals(pa.Table.from_pylist(table, schema=schema))
    # What the fast path does not take falls back to from_pylist, errors included.
    for bad in (dict(rows[0], rows="40"), dict(rows[0], patient_name="\udcff"), dict(rows[0], unknown=1)):
        try:
            want: object = pa.Table.from_pylist([bad], schema=INSTANCES.schema)
        except Exception as exc:  # noqa: BLE001 - the same error type is the point
            with pytest.raises(type(exc)):
                index.to_table([bad], INSTANCES.schema)
        else:
            assert index.to_table([bad], INSTANCES.schema).equals(want)
    assert index.to_table([], INSTANCES.schema).equals(INSTANCES.schema.empty_table())


def test_large_ingests_parse_in_a_process_pool(tmp_path: Path, spool_copy: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool path (very large ingests on machines with cores to spare) indexes the same."""
    from kaapana_assets.ingest import pipeline

    monkeypatch.setattr(pipeline, "POOL_THRESHOLD", 1)
    monkeypatch.setattr(pipeline, "POOL_MIN_WORKERS", 2)
    files = dicom_files(spool_copy)
    targets = Archive.for_home(KaapanaHome(tmp_path / "pooled"))
    try:
        report = ingest_files(files, targets, workers=2, batch_size=7)
        assert pipeline._POOL is not None  # it did run in the pool
    finally:
        pipeline._drop_pool()
    assert report.count("indexed") == len(files)
    assert targets.lake.read(INSTANCES).height == len(files)

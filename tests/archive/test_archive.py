"""The archive service: instances given as bytes stored into the archive and the index, as a
DICOMweb STOW-RS or the receiver would store them."""

from __future__ import annotations

import polars as pl
import pytest

from kaapana_assets.archive import index
from kaapana_assets.archive.layout import ArchiveConflict
from kaapana_assets.archive.service import Archive
from kaapana_assets.ingest.headers import parse_header
from kaapana_assets.lake.schemas import INSTANCES, SEG_SEGMENTS, SERIES, STUDIES
from kaapana_assets.synthetic import GeneratedStudy

ROW = {"study_uid": "2.25.1", "series_uid": "2.25.1.2", "sop_instance_uid": "2.25.1.2.3"}


def test_a_file_is_never_overwritten_unless_no_row_names_it(targets: Archive) -> None:
    row = targets.write(b"first", ROW)
    path = targets.root / row["archive_path"]
    assert row["archive_path"] == "2.25.1/2.25.1.2/2.25.1.2.3.dcm" and row["size_bytes"] == 5
    assert targets.write(b"first", ROW)["sha256"] == row["sha256"]  # the same bytes again: a no-op
    with pytest.raises(ArchiveConflict):
        targets.write(b"second", ROW)
    assert path.read_bytes() == b"first"
    targets.write(b"second", ROW, replace_unindexed=True)
    assert path.read_bytes() == b"second"
    assert not list((targets.root / ".staging").iterdir())


def test_stored_bytes_are_indexed_with_their_segments_and_reconciled(targets: Archive,
                                                                      corpus: dict[str, list[GeneratedStudy]]) -> None:
    study = corpus["site-a"][0]
    assert study.seg_file is not None
    rows = []
    for path in [*study.ct_files, study.seg_file]:
        data = path.read_bytes()
        rows.append(targets.write(data, parse_header(data).as_dict()))
    stored = targets.store(index.to_table(rows, INSTANCES.schema))
    # The SEG's segments commit before the instances rows that name it.
    assert [w.table for w in stored.writes] == ["seg_segments", "instances"]
    assert {s["sop_instance_uid"] for s in stored.segments} == {rows[-1]["sop_instance_uid"]}
    assert targets.lake.read(INSTANCES).height == len(rows)

    reconciled = targets.reconcile({study.study_uid}, heal_segments=False)
    assert [w.table for w in reconciled.writes] == ["series", "studies"] and not reconciled.segments
    assert {s["series_uid"] for s in reconciled.series} == {study.series_uid, study.seg_series_uid}
    assert targets.lake.read(STUDIES, pl.col("study_uid") == study.study_uid).height == 1
    # In order: a second reconcile commits nothing, and finds the segments recorded.
    versions = targets.lake.versions((SERIES, STUDIES, SEG_SEGMENTS))
    assert not targets.reconcile({study.study_uid}).segments
    assert targets.lake.versions((SERIES, STUDIES, SEG_SEGMENTS)) == versions
    assert targets.reindex_segments() == 0


def test_series_and_study_rows_have_exactly_their_tables_columns(corpus: dict[str, list[GeneratedStudy]]) -> None:
    """The tables' schemas are the one list of their columns: archive/index.py computes some
    and carries the rest over from `instances`, and refuses a schema it cannot fill."""
    import datetime as dt

    import pyarrow as pa

    from kaapana_assets.lake.schemas import TableSpec

    study = corpus["site-a"][0]
    assert study.seg_file is not None
    instances = [parse_header(p.read_bytes()).as_dict() for p in (*study.ct_files, study.seg_file)]
    now = dt.datetime.now(dt.timezone.utc)
    series = index.series_rows(instances, now)
    studies = index.study_rows(instances, series, now)
    assert len(series) == 2 and len(studies) == 1
    assert all(list(row) == SERIES.schema.names for row in series)
    assert all(list(row) == STUDIES.schema.names for row in studies)
    ct = next(r for r in series if r["modality"] == "CT")
    assert ct["reference_seg_series_uids"] == [study.seg_series_uid] and ct["manufacturer"]

    grown = TableSpec("series", SERIES.schema.append(pa.field("kernel", pa.string())), SERIES.keys)
    with pytest.raises(ValueError, match=r"neither computed nor carried by instances \['kernel'\]"):
        index.index_row(grown, instances, {k: v for k, v in ct.items() if k not in index.STAMPS})
    shrunk = TableSpec("studies", STUDIES.schema.remove(STUDIES.schema.get_field_index("modalities")), STUDIES.keys)
    with pytest.raises(ValueError, match=r"computed columns not in its schema \['modalities'\]"):
        index.index_row(shrunk, instances, {k: v for k, v in studies[0].items() if k not in index.STAMPS})

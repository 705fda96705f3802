"""Plain rows as Dagster table metadata: only the schema's columns, cells Dagster can store."""

from enum import StrEnum

import dagster as dg
import numpy as np

from kaapana_assets.metadata_table import columns, table


class Reason(StrEnum):
    REPLAYED = "replayed"


def test_rows_become_records_that_serialize() -> None:
    schema = columns(("site", "string"), ("cases", "int"), ("dice", "float", "own validation"), ("reason", "string"))
    rows = [
        {"site": "site-a", "cases": np.int64(4), "dice": np.float32(0.5), "reason": None, "extra": [1, 2]},
        {"site": "site-b", "cases": None, "dice": None, "reason": Reason.REPLAYED},
    ]
    value = table(rows, schema)
    assert [r.data for r in value.records] == [
        {"site": "site-a", "cases": 4, "dice": 0.5, "reason": None},
        {"site": "site-b", "cases": None, "dice": None, "reason": "replayed"},
    ]
    assert type(value.records[1].data["reason"]) is str  # the serializer refuses enums
    assert [c.description for c in value.schema.columns] == [None, None, "own validation", None]
    # What the event log does with it: a StrEnum or numpy scalar here would fail the run.
    assert dg.deserialize_value(dg.serialize_value(value), dg.TableMetadataValue) == value


def test_an_empty_table_keeps_its_columns() -> None:
    value = table([], columns(("label", "string"), ("voxel_count", "int")))
    assert value.records == [] and [c.name for c in value.schema.columns] == ["label", "voxel_count"]

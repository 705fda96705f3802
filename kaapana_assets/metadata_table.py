"""Rows of a plain module as a Dagster table in asset metadata (the Dagster layer: it imports
dagster; the plain modules hand over dicts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dagster as dg

Cell = str | int | float | bool | None


def _cell(value: object) -> Cell:
    # TableRecord checks its value types and Dagster's serializer takes exactly the builtin
    # ones: enums (StrEnum reasons) become their plain value, numpy scalars Python ones,
    # anything else (lists, dates) its text.
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    item = getattr(value, "item", None)
    if callable(item):
        unboxed = item()
        if isinstance(unboxed, str | int | float | bool):
            return _cell(unboxed)
    return str(value)


def columns(*spec: tuple[str, str] | tuple[str, str, str]) -> dg.TableSchema:
    """A schema from (name, type[, description]) tuples; types as Dagster's UI knows them
    (string, int, float, bool)."""
    return dg.TableSchema(columns=[dg.TableColumn(*column) for column in spec])


def table(rows: Iterable[Mapping[str, object]], schema: dg.TableSchema) -> dg.TableMetadataValue:
    """The schema's columns of each row (other keys are left out, a missing one is null). The
    schema is explicit: an empty table keeps its columns, a null cell its column's type."""
    names = [column.name for column in schema.columns]
    return dg.MetadataValue.table(
        records=[dg.TableRecord({name: _cell(row.get(name)) for name in names}) for row in rows], schema=schema
    )


def links_markdown(links: Iterable[tuple[str, dg.UrlMetadataValue]]) -> dg.MarkdownMetadataValue:
    """(text, URL) pairs as a Markdown list of links: the UI shows table cells as plain text,
    Markdown links it makes clickable."""
    return dg.MetadataValue.md("\n".join(f"- [{text}]({link.url})" for text, link in links))

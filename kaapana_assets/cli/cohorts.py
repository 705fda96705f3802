"""Curation: `kaapana cohort list|show` and `kaapana tag add|remove`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from kaapana_assets.cli.common import SubParsers, console, lake_of
from kaapana_assets.environment import Environment


def cmd_cohort_list(args: argparse.Namespace) -> int:
    
    import polars as pl

    from kaapana_assets.cohorts.definitions import EXAMPLES, load_definitions
    from kaapana_assets.lake.schemas import COHORT_MEMBERS

    folder = Path(args.folder or Environment.read().cohorts or EXAMPLES)
    found, errors = load_definitions(folder)
    members = lake_of(args).read(COHORT_MEMBERS)
    table = Table(title=f"cohorts in {folder}")
    for column in ("cohort", "project", "purpose", "latest version", "series", "description"):
        table.add_column(column)
    for name, definition in sorted(found.items()):
        mine = members.filter(pl.col("cohort") == name)
        version = int(mine.select(pl.col("cohort_version").max()).item()) if mine.height else None
        size = mine.filter(pl.col("cohort_version") == version).height if version else 0
        table.add_row(name, definition.project, definition.purpose, str(version or "—"), str(size or "—"),
                      definition.description)
    console.print(table)
    for error in errors:
        console.print(f"[red]invalid:[/] {error}")
    return 1 if errors else 0


def cmd_cohort_show(args: argparse.Namespace) -> int:
    from kaapana_assets.cohorts.membership import UnknownCohortVersion, cohort_versions, read_cohort

    lake = lake_of(args)
    try:
        snapshot = read_cohort(lake, args.name, args.version)
    except UnknownCohortVersion as exc:
        console.print(f"[red]{exc.args[0]}")
        return 2
    versions = cohort_versions(lake, args.name)
    console.print(
        f"[bold]{snapshot.cohort}[/] version {snapshot.version} of {versions.height} "
        f"({snapshot.purpose}) of project {snapshot.project}: {snapshot.size} series, membership "
        f"{snapshot.membership_hash}, read series table version {snapshot.series_table_version}"
    )
    table = Table()
    for column in ("series_uid", "patient_id", "site", "thickness", "spacing", "instances", "labels"):
        table.add_column(column)
    for row in snapshot.members.iter_rows(named=True):
        table.add_row(
            row["series_uid"], row["patient_id"] or "", row.get("institution") or "",
            f"{row.get('slice_thickness') or ''}", f"{row.get('row_spacing') or ''}",
            str(row.get("instance_count") or ""), ",".join(row.get("reference_labels") or []),
        )
    console.print(table)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from kaapana_assets.cohorts.membership import UnknownCohortVersion, read_cohort
    from kaapana_assets.cohorts.tags import add_tag, remove_tag

    lake = lake_of(args)
    series = list(args.series or [])
    if args.cohort:
        try:
            series += read_cohort(lake, args.cohort).members["series_uid"].to_list()
        except UnknownCohortVersion as exc:
            console.print(f"[red]{exc.args[0]}")
            return 2
    if not series:
        console.print("[red]name the series: --series UID ... or --cohort NAME")
        return 2
    try:
        result = (add_tag if args.action == "add" else remove_tag)(lake, args.tag, series)
    except (ValueError, KeyError) as exc:
        console.print(f"[red]{exc.args[0]}")
        return 2
    changed = result.inserted if args.action == "add" else result.deleted
    console.print(f"{args.action} {args.tag!r}: {changed} series changed (tags table version {result.version})")
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser("cohort", help="list cohorts, or show a cohort version as it was snapshotted")
    cohort = p.add_subparsers(dest="cohort_command", required=True)
    q = cohort.add_parser("list", help="cohort definitions and their latest versions")
    q.add_argument("--folder", default=None, help="definitions folder (default: $KAAPANA_COHORTS or the examples)")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_cohort_list)
    q = cohort.add_parser("show", help="members of a cohort version (default: the latest)")
    q.add_argument("name")
    q.add_argument("--version", type=int, default=None)
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_cohort_show)

    p = sub.add_parser("tag", help="add or remove a curation tag on series")
    p.add_argument("action", choices=["add", "remove"])
    p.add_argument("tag")
    p.add_argument("--series", nargs="+", help="SeriesInstanceUIDs")
    p.add_argument("--cohort", help="every series of the cohort's latest version")
    p.add_argument("--home", default=None)
    p.set_defaults(func=cmd_tag)

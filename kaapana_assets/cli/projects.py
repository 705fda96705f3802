"""`kaapana project`: research projects (create, list) and the explicit, logged moves of series
between them (add-series, remove-series, history)."""

from __future__ import annotations

import argparse

from kaapana_assets.cli.common import SubParsers, console, lake_of


def cmd_create(args: argparse.Namespace) -> int:
    from kaapana_assets.projects.catalog import ProjectExists, create_project
    from kaapana_assets.projects.membership import ProjectNameError

    try:
        project = create_project(lake_of(args), args.name, args.title, args.description)
    except (ProjectExists, ProjectNameError, ValueError) as exc:
        console.print(f"[red]{exc}")
        return 2
    console.print(f"project {project.project!r} created: C-STORE to KP-{project.project.upper()}, or drop files into "
                  f"incoming/projects/{project.project}/, or STOW-RS to /dicom-web/projects/{project.project}/studies")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import polars as pl
    from rich.table import Table

    from kaapana_assets.lake.schemas import SERIES_PROJECTS
    from kaapana_assets.projects.catalog import list_projects

    lake = lake_of(args)
    counts = dict(lake.read(SERIES_PROJECTS).group_by("project").agg(pl.len()).iter_rows())
    table = Table(title="projects")
    for column in ("project", "title", "series", "created"):
        table.add_column(column, justify="right" if column == "series" else "left")
    for p in list_projects(lake):
        table.add_row(p.project, p.title, str(counts.get(p.project, 0)),
                      p.created_at.strftime("%Y-%m-%d %H:%M") if p.created_at else "")
    console.print(table)
    return 0


def _change(args: argparse.Namespace, remove: bool) -> int:
    from kaapana_assets.environment import Environment
    from kaapana_assets.projects.assignment import ChangeRefused, add_series, remove_series, unassigned_series
    from kaapana_assets.projects.catalog import UnknownProject
    from kaapana_assets.projects.membership import ProjectNameError

    operator = args.operator or Environment.read().operator
    change = remove_series if remove else add_series
    lake = lake_of(args)
    series_uids = [*args.series_uids, *(unassigned_series(lake) if getattr(args, "unassigned", False) else [])]
    if not series_uids:
        console.print("no series given" + (" (and none is unassigned)" if getattr(args, "unassigned", False) else ""))
        return 0 if getattr(args, "unassigned", False) else 2
    try:
        done = change(lake, args.project, series_uids, operator=operator, reason=args.reason)
    except (ChangeRefused, UnknownProject, ProjectNameError) as exc:
        console.print(f"[red]{exc}")
        return 2
    verb = "removed from" if remove else "added to"
    console.print(f"{len(done.changed)} series {verb} {done.project!r} by {operator} (change {done.change_id}); "
                  f"{len(done.unchanged)} already so")
    if done.moved_to_default:
        console.print(f"{len(done.moved_to_default)} series had no other project: now in the default project")
    return 0


def cmd_add_series(args: argparse.Namespace) -> int:
    return _change(args, remove=False)


def cmd_remove_series(args: argparse.Namespace) -> int:
    return _change(args, remove=True)


def cmd_history(args: argparse.Namespace) -> int:
    from kaapana_assets.projects.assignment import history

    rows = history(lake_of(args), args.series_uid)
    # One line per change, never wrapped: a UID and a reason stay whole for copying and grep.
    for r in rows.iter_rows(named=True):
        console.print(f"{r['changed_at']:%Y-%m-%d %H:%M:%S} {r['action']} {r['series_uid']} "
                      f"{'to' if r['action'] == 'add' else 'from'} {r['project']} by {r['operator']}: {r['reason']}",
                      soft_wrap=True, highlight=False)
    if not rows.height:
        console.print("no changes of project membership logged")
    return 0


def add_parsers(sub: SubParsers) -> None:
    project = sub.add_parser("project", help="research projects: create, list, add-series, remove-series, history")
    commands = project.add_subparsers(dest="project_command", required=True)

    p = commands.add_parser("create", help="a new project (lower-case letters, digits and dashes, ≤ 13)")
    p.add_argument("name")
    p.add_argument("--title", required=True)
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_create)

    p = commands.add_parser("list", help="the projects and how many series each holds")
    p.set_defaults(func=cmd_list)

    for name, func, help_text in (
        ("add-series", cmd_add_series, "put indexed series into a project as well (logged)"),
        ("remove-series", cmd_remove_series, "take series out of a project (logged; a series whose last project "
         "this was goes to the default project; nothing is deleted)"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("project")
        p.add_argument("series_uids", nargs="*", metavar="series_uid")
        if name == "add-series":
            p.add_argument("--unassigned", action="store_true",
                           help="also every indexed series in no project (a home indexed before projects)")
        p.add_argument("--reason", required=True, help="why (kept in project_changes)")
        p.add_argument("--operator", default=None, help="who (default: $KAAPANA_OPERATOR, else $USER)")
        p.set_defaults(func=func)

    p = commands.add_parser("history", help="the logged changes of project membership (of one series)")
    p.add_argument("--series-uid", default=None)
    p.set_defaults(func=cmd_history)

    for p in commands.choices.values():
        p.add_argument("--home", default=None, help="KAAPANA_HOME (default: $KAAPANA_HOME or ./.kaapana)")

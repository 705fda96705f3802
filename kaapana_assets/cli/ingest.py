"""Getting DICOM in: `kaapana synth` (synthetic studies) and `kaapana ingest` (a folder, once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from kaapana_assets.cli.common import SubParsers, console, home_of, lake_of, progress_bar


def cmd_synth(args: argparse.Namespace) -> int:
    from kaapana_assets.synthetic import generate_site

    with progress_bar() as progress:
        task = progress.add_task(f"synthesizing {args.site}", total=args.studies)
        studies = []
        for i in range(args.studies):
            studies += generate_site(
                args.site, 1, args.seed, Path(args.out), with_annotations=args.with_annotations,
                slices=args.slices, matrix=args.matrix, first_index=i,
            )
            progress.advance(task)
    files = sum(len(s.files) for s in studies)
    console.print(f"{len(studies)} studies, {files} files under {Path(args.out) / args.site}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.ingest.pipeline import DEFAULT_BATCH, ingest_files
    from kaapana_assets.progress import throttled
    from kaapana_assets.projects.assignment import ProjectSource
    from kaapana_assets.projects.catalog import UnknownProject, require_project
    from kaapana_assets.projects.membership import ProjectNameError

    root = Path(args.directory)
    if not root.exists():
        console.print(f"[red]no such file or folder: {root}")
        return 2
    files = [str(p) for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()]
    archive = Archive.for_home(home_of(args), lake_of(args))
    try:
        project = require_project(archive.lake, args.project) if args.project else None
    except (ProjectNameError, UnknownProject) as exc:
        console.print(f"[red]--project: {exc}")
        return 2
    # Without --project, a folder laid out as the spool assigns by its projects/<name>/ folders.
    projects = ProjectSource(spool=root if root.is_dir() else None, project=project)
    with progress_bar() as progress:
        task = progress.add_task("ingesting", total=len(files))
        report = ingest_files(
            files, archive, workers=args.workers, batch_size=args.batch_size or DEFAULT_BATCH,
            remove_sources=args.move, projects=projects,
            # The bar redraws ten times a second: more frequent updates would never be seen.
            progress=throttled(lambda done, total: progress.update(task, completed=done), interval_s=0.1),
        )
    table = Table(title=f"ingest of {root}")
    for column in ("indexed", "already indexed", "quarantined", "failed"):
        table.add_column(column, justify="right")
    s = report.summary()
    table.add_row(*(str(s[k]) for k in ("indexed", "already_indexed", "quarantined", "failed")))
    console.print(table)
    for reason, n in sorted(report.reasons.items()):
        console.print(f"  quarantined [yellow]{reason}[/]: {n}")
    console.print(f"Delta versions: {report.versions}")
    return 1 if s["failed"] else 0


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser("synth", help="generate synthetic CT studies of one site")
    p.add_argument("--site", required=True, help="site name (site-a, site-b, site-c or any other)")
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (studies go to OUT/<site>/)")
    p.add_argument("--with-annotations", action="store_true", help="also write the reference DICOM SEG")
    p.add_argument("--slices", type=int, default=None, help="override the scanner's slice count (smaller = faster)")
    p.add_argument("--matrix", type=int, default=None, help="override the in-plane matrix size")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="ingest a folder of DICOM files once, without the daemon")
    p.add_argument("directory")
    p.add_argument("--home", default=None, help="KAAPANA_HOME (default: $KAAPANA_HOME or ./.kaapana)")
    p.add_argument("--workers", type=int, default=None,
                   help="parser processes (default: all cores; a pool only for ≥ 20,000 files and ≥ 3 workers, "
                   "else one parsing thread beside the commits)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="files per committed batch (default 2,000: each costs one Delta MERGE)")
    p.add_argument("--move", action="store_true", help="delete each source file once it is committed")
    p.add_argument("--project", default=None,
                   help="the research project of every series (default: a file under projects/<name>/ of the "
                   "folder goes to <name>, any other to the default project)")
    p.set_defaults(func=cmd_ingest)

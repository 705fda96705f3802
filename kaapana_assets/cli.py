"""The `kaapana` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from kaapana_assets.synthetic import generate_site

    with _progress() as progress:
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
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import IngestTargets, ingest_files

    root = Path(args.directory)
    if not root.exists():
        console.print(f"[red]no such file or folder: {root}")
        return 2
    files = [str(p) for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()]
    home = KaapanaHome(Path(args.home)) if args.home else KaapanaHome.from_env()
    targets = IngestTargets.for_home(home)
    with _progress() as progress:
        task = progress.add_task("ingesting", total=len(files))
        report = ingest_files(
            files, targets, workers=args.workers, batch_size=args.batch_size,
            remove_sources=args.move,
            progress=lambda done, total: progress.update(task, completed=done),
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


def cmd_demo(args: argparse.Namespace) -> int:
    from kaapana_assets.demo import run_demo

    return run_demo(console, sites=args.sites, studies=args.studies, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaapana", description="kaapana_assets: federated medical-imaging platform")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--workers", type=int, default=None, help="parser processes (default: all cores)")
    p.add_argument("--batch-size", type=int, default=1000, help="files per committed batch")
    p.add_argument("--move", action="store_true", help="delete each source file once it is committed")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("demo", help="run the demo end to end on the embedded defaults")
    p.add_argument("--sites", nargs="+", default=["site-a", "site-b"])
    p.add_argument("--studies", type=int, default=4, help="studies per site")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

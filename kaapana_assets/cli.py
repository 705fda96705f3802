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


def _lake(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.lake import Lake

    home = KaapanaHome(Path(args.home)) if args.home else KaapanaHome.from_env()
    return Lake(home.lake)


def cmd_cohort_list(args: argparse.Namespace) -> int:
    import os

    import polars as pl

    from kaapana_assets.cohorts.definitions import EXAMPLES, load_definitions

    folder = Path(args.folder or os.environ.get("KAAPANA_COHORTS") or EXAMPLES)
    found, errors = load_definitions(folder)
    members = _lake(args).read("cohort_members")
    table = Table(title=f"cohorts in {folder}")
    for column in ("cohort", "purpose", "latest version", "series", "description"):
        table.add_column(column)
    for name, definition in sorted(found.items()):
        mine = members.filter(pl.col("cohort") == name)
        version = int(mine["cohort_version"].max()) if mine.height else None  # type: ignore[arg-type]
        size = mine.filter(pl.col("cohort_version") == version).height if version else 0
        table.add_row(name, definition.purpose, str(version or "—"), str(size or "—"), definition.description)
    console.print(table)
    for error in errors:
        console.print(f"[red]invalid:[/] {error}")
    return 1 if errors else 0


def cmd_cohort_show(args: argparse.Namespace) -> int:
    from kaapana_assets.cohorts.membership import UnknownCohortVersion, cohort_versions, read_cohort

    lake = _lake(args)
    try:
        snapshot = read_cohort(lake, args.name, args.version)
    except UnknownCohortVersion as exc:
        console.print(f"[red]{exc.args[0]}")
        return 2
    versions = cohort_versions(lake, args.name)
    console.print(
        f"[bold]{snapshot.cohort}[/] version {snapshot.version} of {versions.height} "
        f"({snapshot.purpose}): {snapshot.size} series, membership {snapshot.membership_hash}, "
        f"read series table version {snapshot.series_table_version}"
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

    lake = _lake(args)
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


def _tracking(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.training.tracking import default_tracking

    return default_tracking(KaapanaHome(Path(args.home)).root if args.home else KaapanaHome.from_env().root)


def cmd_model_promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    tracking = _tracking(args)
    try:
        version = tracking.client().get_model_version(args.name, str(args.version))
        tracking.promote(args.name, args.version, args.alias)
    except MlflowException as exc:
        console.print(f"[red]{exc.message}")
        return 2
    console.print(f"{args.name} v{version.version} now holds the alias '{args.alias}' "
                  f"(validation: {version.tags.get('kaapana.validation', 'unknown')})")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from kaapana_assets.segmentation.models import InvalidModelFolder, import_model

    try:
        version = import_model(_tracking(args), Path(args.path), args.name, promote=args.promote)
    except InvalidModelFolder as exc:
        console.print(f"[red]{exc}")
        return 2
    console.print(f"registered {args.name} v{version.version} from {args.path}"
                  + (" and promoted it to production" if args.promote else "; promote it with `kaapana model promote`"))
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    client = _tracking(args).client()
    table = Table(title="registered models")
    for column in ("model", "version", "aliases", "validation", "dice", "cohort version", "run"):
        table.add_column(column)
    for model in client.search_registered_models():
        for v in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            aliases = [a for a, n in (model.aliases or {}).items() if str(n) == str(v.version)]
            table.add_row(model.name, str(v.version), ",".join(aliases), v.tags.get("kaapana.validation", ""),
                          v.tags.get("kaapana.validation_dice", ""), v.tags.get("kaapana.cohort_version", ""),
                          (v.run_id or "")[:12])
    console.print(table)
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.network.receiver import start_receiver, stop_receiver

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    home = KaapanaHome(Path(args.home)) if args.home else KaapanaHome.from_env()
    spool = Path(args.spool) if args.spool else home.ensure().incoming
    server = start_receiver(
        spool, args.host, args.port, args.ae_title, args.allow or None, block=False,
        acse_timeout=args.acse_timeout, dimse_timeout=args.dimse_timeout, idle_timeout=args.idle_timeout,
        max_associations=args.max_associations, max_per_caller=args.max_per_caller,
    )
    assert server is not None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"receiving as {args.ae_title} on {args.host}:{args.port} → {spool} (Ctrl-C stops)")
    while not stop.wait(0.5):  # a timed wait lets the signal handler run
        pass
    stop_receiver(server)  # aborts running associations: a stalled peer must not hold up shutdown
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from kaapana_assets.network.sender import DicomNode, record_sent, send_files

    files = [p for f in args.files for p in ([f] if Path(f).is_file() else sorted(Path(f).rglob("*.dcm")))]
    if not files:
        console.print("[red]no files to send")
        return 2
    node = DicomNode(args.ae_title, args.host, args.port)
    outcomes = send_files(files, node, args.calling_ae_title, retries=args.retries)
    if not args.no_record:
        record_sent(_lake(args), outcomes, node)
    failed = [o for o in outcomes if o.status != "success"]
    console.print(f"sent {len(outcomes) - len(failed)}/{len(outcomes)} to {node}")
    for o in failed:
        console.print(f"  [red]{o.path}: {o.error}")
    return 1 if failed else 0


def cmd_pull(args: argparse.Namespace) -> int:
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.network.dicomweb import DicomWebSource

    home = KaapanaHome(Path(args.home)) if args.home else KaapanaHome.from_env()
    source = DicomWebSource(args.url, args.name)
    studies = args.study or [m.study_uid for m in source.search_studies(**dict(f.split("=", 1) for f in args.filter))]
    total = 0
    for study_uid in studies:
        total += len(source.retrieve_study(study_uid, home.ensure().incoming))
    console.print(f"retrieved {total} instance(s) of {len(studies)} study(ies) into {home.incoming}")
    return 0


def cmd_federation_key(args: argparse.Namespace) -> int:
    from kaapana_assets.federated.exchange import generate_site_key

    # Only the key on stdout, so it can be piped straight into a secret store.
    print(generate_site_key())
    return 0


def cmd_federation_rounds(args: argparse.Namespace) -> int:
    import polars as pl

    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.lake import Lake

    lake = Lake(KaapanaHome(Path(args.home)).lake if args.home else KaapanaHome.from_env().lake)
    if not lake.exists("federated_rounds"):
        console.print("[yellow]no federated round has run at this hub yet")
        return 1
    rows = lake.read("federated_rounds", pl.col("experiment") == args.experiment).sort(["round", "site"])
    table = Table(title=f"federated rounds of {args.experiment}")
    for column in ("round", "site", "status", "cases", "train loss", "Dice", "reason"):
        table.add_column(column)
    for r in rows.iter_rows(named=True):
        table.add_row(str(r["round"]), r["site"], r["status"], str(r["cases"] or ""),
                      f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "",
                      f"{r['dice']:.3f}" if r["dice"] is not None else "", r["reason"] or "")
    console.print(table)
    return 0 if rows.height else 1


def cmd_lineage(args: argparse.Namespace) -> int:
    from rich.tree import Tree

    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.lineage import LineageNotFound, Node, trace

    home = KaapanaHome(Path(args.home)) if args.home else KaapanaHome.from_env()
    try:
        root = trace(home, _tracking(args), args.uid)
    except LineageNotFound as exc:
        console.print(f"[red]{exc}")
        return 2

    def grow(tree: Tree, node: Node) -> None:
        for child in node.children:
            grow(tree.add(child.label), child)

    tree = Tree(f"[bold]{root.label}")
    grow(tree, root)
    console.print(tree)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kaapana_assets.demo import run_demo

    return run_demo(console, sites=args.sites, studies=args.studies, seed=args.seed, rounds=args.rounds,
                    new_studies=args.new_studies, grid={"slices": args.slices, "matrix": args.matrix},
                    schedule=args.schedule, promotion_dice=args.promotion_dice)


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

    p = sub.add_parser("model", help="the MLflow model registry: list versions, promote one to production")
    model = p.add_subparsers(dest="model_command", required=True)
    q = model.add_parser("list", help="registered models, versions, aliases and validation results")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_model_list)
    q = model.add_parser("import", help="register an nnU-Net v2 results folder already on disk (nothing is downloaded)")
    q.add_argument("path", help="folder with dataset.json, plans.json and fold_*/checkpoint_final.pth")
    q.add_argument("--name", required=True, help="registered model name")
    q.add_argument("--promote", action="store_true", help="also give it the alias production")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_model_import)
    q = model.add_parser("promote", help="give a model version the alias (default: production), explicitly")
    q.add_argument("name")
    q.add_argument("version", type=int)
    q.add_argument("--alias", default="production")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_model_promote)

    p = sub.add_parser(
        "receive", help="run the DICOM C-STORE receiver feeding the spool",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A DICOM Storage SCP (every storage SOP class and transfer syntax, and C-ECHO) that writes\n"
        "each instance byte for byte into the spool and acknowledges it once it is on disk.\n\n"
        "Refused with a failure status, nothing stored, a 'refused ...' log line:\n"
        "  0xC210 Cannot Understand: empty, garbage, malformed or truncated data sets, and\n"
        "         deflated ones inflating beyond 256 MiB (inflation bombs);\n"
        "  0xA900 Data Set Does Not Match SOP Class: missing required attributes, invalid UIDs,\n"
        "         no codec for the transfer syntax, or a SOP Instance/Class UID other than the\n"
        "         C-STORE request's Affected SOP Instance/Class UID.\n\n"
        "Abuse limits: a connection must send its A-ASSOCIATE-RQ within --acse-timeout; an\n"
        "association silent for --idle-timeout is aborted; at most --max-associations run at once,\n"
        "and at most --max-per-caller from one IP address (checked on accept: an excess connection\n"
        "gets A-ASSOCIATE-RJ 'local limit exceeded' and the refusal is logged).",
    )
    p.add_argument("--ae-title", default="KAAPANA")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--allow", nargs="*", help="calling AE titles allowed (default: any)")
    p.add_argument("--spool", default=None, help="default: $KAAPANA_HOME/incoming")
    p.add_argument("--home", default=None)
    p.add_argument("--max-per-caller", type=int, default=16, metavar="N",
                   help="concurrent associations allowed from one IP address (default: %(default)s)")
    p.add_argument("--max-associations", type=int, default=256, metavar="N",
                   help="concurrent associations in all (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="abort an association that sends nothing for S seconds (default: %(default)s)")
    p.add_argument("--acse-timeout", type=float, default=30.0, metavar="S",
                   help="wait at most S seconds for an association request or release (default: %(default)s)")
    p.add_argument("--dimse-timeout", type=float, default=30.0, metavar="S",
                   help="wait at most S seconds for a DIMSE message (default: %(default)s)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("send", help="C-STORE files (or folders of .dcm) to a DICOM node")
    p.add_argument("files", nargs="+")
    p.add_argument("--ae-title", required=True, help="remote AE title")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--calling-ae-title", default="KAAPANA")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--no-record", action="store_true", help="do not record in the `sent` table")
    p.add_argument("--home", default=None)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("pull", help="retrieve studies from a DICOMweb server (QIDO-RS/WADO-RS) into the spool")
    p.add_argument("--url", required=True, help="DICOMweb base URL")
    p.add_argument("--study", nargs="*", help="StudyInstanceUIDs (default: every study matching --filter)")
    p.add_argument("--filter", nargs="*", default=[], help="QIDO filters, e.g. ModalitiesInStudy=CT")
    p.add_argument("--name", default="dicomweb", help="spool folder name")
    p.add_argument("--home", default=None)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("federation", help="federated training: site keys and round history")
    federation = p.add_subparsers(dest="federation_command", required=True)
    q = federation.add_parser("key", help="print a new AES-256 site key (base64); give each site its own")
    q.set_defaults(func=cmd_federation_key)
    q = federation.add_parser("rounds", help="the federated_rounds table of an experiment, at this hub")
    q.add_argument("experiment")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_federation_rounds)

    p = sub.add_parser("lineage", help="a SEG's chain: model → rounds or training run → cohort → Delta → source UIDs")
    p.add_argument("uid", help="SEG SOPInstanceUID, SEG series UID, or the segmented series UID")
    p.add_argument("--home", default=None)
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("demo", help="run the demo end to end on the embedded defaults")
    p.add_argument("--sites", nargs="+", default=["site-a", "site-b", "site-c"])
    p.add_argument("--studies", type=int, default=4, help="annotated studies per site")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--new-studies", type=int, default=2, help="unannotated studies that arrive afterwards")
    p.add_argument("--matrix", type=int, default=48, help="in-plane size of the synthetic CT (smaller = faster)")
    p.add_argument("--slices", type=int, default=None,
                   help="slices per CT (default: the scanner's; fewer means thicker slices, which the "
                        "liver-train cohort's 5 mm limit excludes)")
    p.add_argument("--schedule", default="short", choices=["tiny", "short", "full"], help="local training preset")
    p.add_argument("--promotion-dice", type=float, default=0.7,
                   help="cross-site Dice the federated model needs to become production (demo: 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""DICOM in and out over the network: `kaapana receive` (C-STORE SCP into the spool),
`kaapana send` (C-STORE SCU) and `kaapana pull` (DICOMweb into the spool)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kaapana_assets.cli.common import SubParsers, console, home_of, lake_of


def cmd_receive(args: argparse.Namespace) -> int:
    import logging

    from kaapana_assets.environment import Environment
    from kaapana_assets.network.receiver import ReceiverSettings
    from kaapana_assets.network.workers import supervise
    from kaapana_assets.projects.routing import AeTitleRouting

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    spool = Path(args.spool) if args.spool else home_of(args).ensure().incoming
    mapping = Environment.read().project_ae_titles  # a value that is no JSON: ValueError naming the variable
    try:
        routing = AeTitleRouting.parse(mapping)
    except ValueError as exc:
        console.print(f"[red]KAAPANA_PROJECT_AE_TITLES: {exc}")
        return 2
    settings = ReceiverSettings(
        spool, args.host, args.port, args.ae_title, tuple(args.allow or ()), acse_timeout=args.acse_timeout,
        dimse_timeout=args.dimse_timeout, idle_timeout=args.idle_timeout, max_associations=args.max_associations,
        max_per_caller=args.max_per_caller, checkpoint_s=args.checkpoint_interval, routing=routing,
    )
    console.print(f"receiving as {args.ae_title} on {args.host}:{args.port} → {spool} with {args.workers} worker(s) "
                  "(Ctrl-C stops)")
    # Stops on SIGTERM/SIGINT: each worker aborts its running associations (a stalled peer
    # must not hold up shutdown) and makes every acknowledged instance durable in the spool.
    return supervise(settings, args.workers)


def cmd_send(args: argparse.Namespace) -> int:
    from kaapana_assets.network.sender import DicomNode, record_sent, send_files

    files = [p for f in args.files for p in ([f] if Path(f).is_file() else sorted(Path(f).rglob("*.dcm")))]
    if not files:
        console.print("[red]no files to send")
        return 2
    node = DicomNode(args.ae_title, args.host, args.port)
    outcomes = send_files(files, node, args.calling_ae_title, retries=args.retries)
    if not args.no_record:
        record_sent(lake_of(args), outcomes, node)
    failed = [o for o in outcomes if o.status != "success"]
    console.print(f"sent {len(outcomes) - len(failed)}/{len(outcomes)} to {node}")
    for o in failed:
        console.print(f"  [red]{o.path}: {o.error}")
    return 1 if failed else 0


def cmd_pull(args: argparse.Namespace) -> int:
    from kaapana_assets.network.dicomweb import DicomWebSource

    home = home_of(args)
    source = DicomWebSource(args.url, args.name)
    studies = args.study or [m.study_uid for m in source.search_studies(**dict(f.split("=", 1) for f in args.filter))]
    total = 0
    for study_uid in studies:
        total += len(source.retrieve_study(study_uid, home.ensure().incoming))
    console.print(f"retrieved {total} instance(s) of {len(studies)} study(ies) into {home.incoming}")
    return 0


RECEIVE_DESCRIPTION = (
    "A DICOM Storage SCP (every storage SOP class and transfer syntax, and C-ECHO) that writes\n"
    "each instance byte for byte into the spool and acknowledges it once it is on disk\n"
    "(appended to the receive journal, $SPOOL-journal beside the spool, and flushed; the journal's checkpoints\n"
    "make the spool files durable, and a restart after a crash writes back what they lost).\n\n"
    "Refused with a failure status, nothing stored, a 'refused ...' log line:\n"
    "  0xC210 Cannot Understand: empty, garbage, malformed or truncated data sets, and\n"
    "         deflated ones inflating beyond 256 MiB (inflation bombs);\n"
    "  0xA900 Data Set Does Not Match SOP Class: missing required attributes, invalid UIDs,\n"
    "         no codec for the transfer syntax, or a SOP Instance/Class UID other than the\n"
    "         C-STORE request's Affected SOP Instance/Class UID.\n\n"
    "Abuse limits: a connection must send its A-ASSOCIATE-RQ within --acse-timeout; an\n"
    "association silent for --idle-timeout is aborted; at most --max-associations run at once,\n"
    "and at most --max-per-caller from one IP address (checked on accept: an excess connection\n"
    "gets A-ASSOCIATE-RJ 'local limit exceeded' and the refusal is logged).\n\n"
    "Workers: --workers processes accept on the one port (the kernel hands each connection to\n"
    "one waiting in accept), each with its own journal segment; the limits count over all of\n"
    "them. A worker that dies is replaced, and its journal segment replayed before the\n"
    "replacement accepts. SIGTERM/SIGINT stops every worker cleanly."
)


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser(
        "receive", help="run the DICOM C-STORE receiver feeding the spool",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=RECEIVE_DESCRIPTION,
    )
    p.add_argument("--ae-title", default="KAAPANA")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--allow", nargs="*", help="calling AE titles allowed (default: any)")
    p.add_argument("--spool", default=None, help="default: $KAAPANA_HOME/incoming")
    p.add_argument("--home", default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="receiver processes accepting on the one port (default: the number of cores, %(default)s)")
    p.add_argument("--max-per-caller", type=int, default=16, metavar="N",
                   help="concurrent associations allowed from one IP address, over all workers (default: %(default)s)")
    p.add_argument("--max-associations", type=int, default=256, metavar="N",
                   help="concurrent associations in all, over all workers (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="abort an association that sends nothing for S seconds (default: %(default)s)")
    p.add_argument("--acse-timeout", type=float, default=30.0, metavar="S",
                   help="wait at most S seconds for an association request or release (default: %(default)s)")
    p.add_argument("--dimse-timeout", type=float, default=30.0, metavar="S",
                   help="wait at most S seconds for a DIMSE message (default: %(default)s)")
    p.add_argument("--checkpoint-interval", type=float, default=1.0, metavar="S",
                   help="make the spool files durable and reuse the journal every S seconds "
                        "(keep it well below the spool's quiet period; default: %(default)s)")
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

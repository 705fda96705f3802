"""Federated training at the command line: `kaapana federation ...`.

The federation runs on Flower: the hub runs one SuperLink (TLS with the hub's certificate,
SuperNode authentication on), every site one SuperNode that dials out to it. These commands
make the credentials (`certificates`, `node-keys`, `key`), register a site's SuperNode at
the SuperLink (`register`), print the exact command lines of both processes
(`superlink-command`, `supernode-command`) and show an experiment's rounds (`rounds`).

What a script consumes (a key, a command line) goes to stdout alone; notes for the
administrator go to stderr, so `$(kaapana federation key)` and friends stay clean.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kaapana_assets.cli.common import SubParsers, console, lake_of

DEFAULT_PORT = 9092
# Notes beside what a command prints for scripts: on stderr, so stdout stays consumable.
notes = Console(stderr=True)


def _path(path: Path) -> str:
    return escape(str(path))


def _say(text: str, stderr: bool = False) -> None:
    """Human text: no highlighting, and paths and flags are never broken across lines."""
    (notes if stderr else console).print(text, highlight=False, soft_wrap=True)


def _refuse_overwrite(paths: list[Path], force: bool) -> bool:
    """True (and a message) when one of `paths` exists and --force was not given."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        _say(f"[red]{_path(existing[0])} exists; refusing to overwrite credentials that may already be in use "
             "(pass --force to replace them)")
        return True
    return False


def cmd_federation_key(args: argparse.Namespace) -> int:
    from kaapana_assets.federation.keys import generate_site_key

    # Only the key on stdout, so it can be piped straight into a secret store.
    print(generate_site_key())
    return 0


def cmd_federation_certificates(args: argparse.Namespace) -> int:
    from kaapana_assets.federation.credentials import create_hub_certificates

    out = Path(args.out)
    if _refuse_overwrite([out / "ca.pem", out / "server.pem", out / "server.key"], args.force):
        return 1
    paths = create_hub_certificates(out, list(args.host), days=args.days)
    _say(f"hub CA and SuperLink certificate for {escape(', '.join(args.host))} "
         f"(valid {args.days} days) in {_path(out)}:")
    _say(f"  {_path(paths['ca'])}  → every site (its SuperNode's --root-certificates); not secret")
    _say(f"  {_path(paths['certificate'])}  → stays at the hub (SuperLink --ssl-certfile)")
    _say(f"  {_path(paths['key'])}  → stays at the hub (SuperLink --ssl-keyfile); secret, never leaves it")
    return 0


def _site_name(value: str) -> str | None:
    """The site name if it is allowed (it names files and node config); else None, said."""
    from kaapana_assets.federation.store import checked_name

    try:
        return checked_name("site", value)
    except ValueError as exc:
        _say(f"[red]{escape(str(exc))}")
        return None


def cmd_federation_node_keys(args: argparse.Namespace) -> int:
    from kaapana_assets.federation.credentials import create_node_keys

    site = _site_name(args.site)
    if site is None:
        return 2
    out = Path(args.out)
    if _refuse_overwrite([out / f"{site}.key", out / f"{site}.pub"], args.force):
        return 1
    private, public = create_node_keys(out, site)
    _say(f"SuperNode key pair of {escape(site)} (EC P-384, OpenSSH format):")
    _say(f"  {_path(public)}  → to the hub administrator, who registers it (`kaapana federation register`)")
    _say(f"  {_path(private)}  → stays at the site (SuperNode --auth-supernode-private-key); secret")
    return 0


def cmd_federation_register(args: argparse.Namespace) -> int:
    import subprocess

    from kaapana_assets.environment import Environment
    from kaapana_assets.federation.runs import Connection
    from kaapana_assets.federation.superlink import register_node
    from kaapana_assets.home import KaapanaHome

    public_key, ca = Path(args.public_key).resolve(), Path(args.ca).resolve()
    for path, what in ((public_key, "public key"), (ca, "CA certificate")):
        if not path.is_file():
            _say(f"[red]{what} {_path(path)} does not exist")
            return 2
    flwr_home = Path(args.flwr_home).resolve() if args.flwr_home else KaapanaHome(Environment.read().home).hub_federation / "flwr"
    try:
        answer = register_node(Connection(args.superlink, ca, flwr_home), public_key)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _say(f"[red]{escape(str(exc))}")
        return 1
    _say(f"registered {_path(public_key)} at {escape(args.superlink)}: {escape(answer)}")
    return 0


def cmd_federation_superlink_command(args: argparse.Namespace) -> int:
    from kaapana_assets.federation.superlink import superlink_command

    certificates = Path(args.certificates)
    paths = {"ca": certificates / "ca.pem", "certificate": certificates / "server.pem",
             "key": certificates / "server.key"}
    database = Path(args.database) if args.database else certificates.parent / "superlink.db"
    print(shlex.join(superlink_command(paths, args.host, args.port, database)))
    _say(f"Sites must be allowed to reach this hub outbound on TCP port {args.port} only "
         "(Fleet and Control APIs share it; TLS is always on).", stderr=True)
    return 0


def cmd_federation_supernode_command(args: argparse.Namespace) -> int:
    from kaapana_assets.federation.superlink import superexec_command, supernode_command

    site = _site_name(args.site)
    if site is None:
        return 2
    print(shlex.join(supernode_command(args.superlink, Path(args.ca), Path(args.node_key), site, Path(args.home),
                                       runtime_port=args.runtime_port, device=args.device, threads=args.threads,
                                       share_local_model=args.share_local_model)))
    print(shlex.join(superexec_command(args.runtime_port)))
    _say("Two services on the site's machine: the SuperNode (first line) and its SuperExec (second line), "
         "which starts the ClientApp processes that train.", stderr=True)
    _say(f"Run the SuperExec with KAAPANA_SITE_KEY set to {escape(site)}'s signing key (`kaapana federation key`; "
         "a secret, never in the command line).", stderr=True)
    _say(f"The SuperNode dials out to {escape(args.superlink)} and opens no inbound port: its runtime API "
         f"listens on 127.0.0.1:{args.runtime_port} only.", stderr=True)
    return 0


def cmd_federation_rounds(args: argparse.Namespace) -> int:
    import polars as pl

    from kaapana_assets.lake.schemas import FEDERATED_ROUNDS

    lake = lake_of(args)
    if not lake.exists(FEDERATED_ROUNDS):
        console.print("[yellow]no federated round has run at this hub yet")
        return 1
    rows = lake.read(FEDERATED_ROUNDS, pl.col("experiment") == args.experiment).sort(["round", "site"])
    table = Table(title=f"federated rounds of {args.experiment}")
    for column in ("round", "site", "status", "cases", "train loss", "Dice", "ε so far", "reason"):
        table.add_column(column)
    for r in rows.iter_rows(named=True):
        epsilon = r.get("epsilon")  # a table older than the column has none
        table.add_row(str(r["round"]), r["site"], r["status"], str(r["cases"] or ""),
                      f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "",
                      f"{r['dice']:.3f}" if r["dice"] is not None else "",
                      f"{epsilon:.4g}" if epsilon is not None else "", r["reason"] or "")
    console.print(table)
    return 0 if rows.height else 1


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser("federation", help="federated training on Flower: credentials, SuperLink and SuperNode "
                       "command lines, node registration, round history")
    federation = p.add_subparsers(dest="federation_command", required=True)

    q = federation.add_parser("key", help="print a new 256-bit site signing key (base64); give each site its own")
    q.set_defaults(func=cmd_federation_key)

    q = federation.add_parser("certificates", help="create the hub's CA and the SuperLink's TLS certificate")
    q.add_argument("--host", action="append", required=True,
                   help="DNS name or IP address the sites dial (repeat for several); the first is the subject")
    q.add_argument("--out", required=True, help="folder for ca.pem, server.pem and server.key")
    q.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    q.add_argument("--force", action="store_true", help="replace existing certificates")
    q.set_defaults(func=cmd_federation_certificates)

    q = federation.add_parser("node-keys", help="create a site's SuperNode key pair (SITE.key, SITE.pub)")
    q.add_argument("site")
    q.add_argument("--out", required=True, help="folder for SITE.key and SITE.pub")
    q.add_argument("--force", action="store_true", help="replace an existing key pair")
    q.set_defaults(func=cmd_federation_node_keys)

    q = federation.add_parser("register", help="register a site's SuperNode public key at the SuperLink")
    q.add_argument("public_key", metavar="PUBLIC_KEY", help="the site's SITE.pub")
    q.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    q.add_argument("--ca", required=True, metavar="CA.pem", help="the hub CA that signed the SuperLink's certificate")
    q.add_argument("--flwr-home", default=None, metavar="DIR",
                   help="FLWR_HOME of the `flwr` CLI (default: $KAAPANA_HOME/federation/flwr)")
    q.set_defaults(func=cmd_federation_register)

    q = federation.add_parser("superlink-command", help="print the hub's flower-superlink command line")
    q.add_argument("--certificates", required=True, metavar="DIR",
                   help="folder with ca.pem, server.pem, server.key (`kaapana federation certificates`)")
    q.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    q.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the one port of the SuperLink (default "
                   f"{DEFAULT_PORT})")
    q.add_argument("--database", default=None, metavar="PATH",
                   help="SuperLink state (SQLite; default: superlink.db beside the certificates folder)")
    q.set_defaults(func=cmd_federation_superlink_command)

    q = federation.add_parser("supernode-command",
                              help="print a site's flower-supernode and kaapana-superexec command lines")
    q.add_argument("--site", required=True, metavar="NAME", help="the site's name in the federation file")
    q.add_argument("--home", required=True, metavar="PATH", help="the site's KAAPANA_HOME")
    q.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the hub's SuperLink")
    q.add_argument("--ca", required=True, metavar="CA.pem", help="the hub CA (ca.pem from the hub administrator)")
    q.add_argument("--node-key", required=True, metavar="SITE.key", help="the site's SuperNode private key")
    q.add_argument("--device", default="auto", help="training device: auto, cpu, cuda (default auto)")
    q.add_argument("--threads", type=int, default=2, help="CPU threads of local training (default 2)")
    q.add_argument("--share-local-model", action="store_true",
                   help="consent to cross-site evaluation: a local-only baseline of this site goes, through the "
                        "hub, to every other site (default off)")
    q.add_argument("--runtime-port", type=int, default=9094,
                   help="loopback port of the SuperNode's runtime API, for its SuperExec (default 9094)")
    q.set_defaults(func=cmd_federation_supernode_command)

    q = federation.add_parser("rounds", help="the federated_rounds table of an experiment, at this hub")
    q.add_argument("experiment")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_federation_rounds)

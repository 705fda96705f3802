"""Federated training at the command line: `kaapana federation key|rounds`."""

from __future__ import annotations

import argparse

from rich.table import Table

from kaapana_assets.cli.common import SubParsers, console, lake_of


def cmd_federation_key(args: argparse.Namespace) -> int:
    from kaapana_assets.federated.exchange import generate_site_key

    # Only the key on stdout, so it can be piped straight into a secret store.
    print(generate_site_key())
    return 0


def cmd_federation_rounds(args: argparse.Namespace) -> int:
    import polars as pl

    lake = lake_of(args)
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


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser("federation", help="federated training: site keys and round history")
    federation = p.add_subparsers(dest="federation_command", required=True)
    q = federation.add_parser("key", help="print a new AES-256 site key (base64); give each site its own")
    q.set_defaults(func=cmd_federation_key)
    q = federation.add_parser("rounds", help="the federated_rounds table of an experiment, at this hub")
    q.add_argument("experiment")
    q.add_argument("--home", default=None)
    q.set_defaults(func=cmd_federation_rounds)

"""The `kaapana` command: argument wiring here, one module per subject.

Importing it stays light (argparse and rich): each command imports what it needs when it
runs, so `kaapana --help` is quick and nothing heavy loads before a command needs it."""

from __future__ import annotations

import argparse
import sys

from kaapana_assets.cli import cohorts, demo, dicomweb, federation, gateway, ingest, lineage, models, network, projects
from kaapana_assets.cli.common import console

__all__ = ["build_parser", "console", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaapana", description="kaapana_assets: federated medical-imaging platform")
    sub = parser.add_subparsers(dest="command", required=True)
    # The order of `kaapana --help`: data in, projects, curation, models, DICOM network and DICOMweb,
    # federation, lineage, demo.
    for subject in (ingest, projects, cohorts, models, network, dicomweb, gateway, federation, lineage, demo):
        subject.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

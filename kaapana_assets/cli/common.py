"""What every subcommand shares: the console, the progress bar, and where KAAPANA_HOME, its
lake and its MLflow tracking are. Heavy modules are imported inside the functions: the CLI
starts fast, and `kaapana --help` loads no Delta, polars or MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.lake import Lake
    from kaapana_assets.training.tracking import Tracking

console = Console()

# What `add_subparsers` returns; argparse names it privately and subscripts it only in typeshed.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def home_of(args: argparse.Namespace) -> KaapanaHome:
    """--home, else $KAAPANA_HOME, else ./.kaapana."""
    from kaapana_assets.environment import Environment
    from kaapana_assets.home import KaapanaHome

    return KaapanaHome(Path(args.home)) if args.home else KaapanaHome(Environment.read().home)


def lake_of(args: argparse.Namespace) -> Lake:
    """KAAPANA_LAKE_URI (with its S3 settings), else the lake of --home."""
    from kaapana_assets.environment import Environment
    from kaapana_assets.lake import Lake

    return Lake.of(Environment.read(home=home_of(args).root))


def tracking_of(args: argparse.Namespace) -> Tracking:
    from kaapana_assets.environment import Environment
    from kaapana_assets.training.tracking import default_tracking

    return default_tracking(Environment.read(home=home_of(args).root))

"""The MLflow model registry: `kaapana model list|import|promote`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from kaapana_assets.cli.common import SubParsers, console, tracking_of


def cmd_model_promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from kaapana_assets.nnunet.registry import ModelVersionNotFound, require_version

    tracking = tracking_of(args)
    try:
        version = require_version(tracking, args.name, args.version)
        tracking.promote(args.name, args.version, args.alias)
    except ModelVersionNotFound as exc:
        console.print(f"[red]{exc}")
        return 2
    except MlflowException as exc:
        console.print(f"[red]{exc.message}")
        return 2
    console.print(f"{args.name} v{version.version} now holds the alias '{args.alias}' "
                  f"(validation: {version.tags.get('kaapana.validation', 'unknown')})")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from kaapana_assets.segmentation.models import InvalidModelFolder, import_model

    try:
        version = import_model(tracking_of(args), Path(args.path), args.name, promote=args.promote)
    except InvalidModelFolder as exc:
        console.print(f"[red]{exc}")
        return 2
    console.print(f"registered {args.name} v{version.version} from {args.path}"
                  + (" and promoted it to production" if args.promote else "; promote it with `kaapana model promote`"))
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    client = tracking_of(args).client()
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


def add_parsers(sub: SubParsers) -> None:
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

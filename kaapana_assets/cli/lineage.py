"""`kaapana lineage`: a SEG's chain back to its source DICOM."""

from __future__ import annotations

import argparse

from kaapana_assets.cli.common import SubParsers, console, home_of, lake_of, tracking_of


def cmd_lineage(args: argparse.Namespace) -> int:
    from rich.tree import Tree

    from kaapana_assets.lineage import LineageNotFound, Node, trace

    try:
        root = trace(home_of(args), tracking_of(args), args.uid, lake_of(args))
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


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser("lineage", help="a SEG's, a model's or an evaluation's chain: model → rounds or training run → "
                       "cohort → Delta → source UIDs")
    p.add_argument("uid", help="SEG SOPInstanceUID, SEG series UID, the segmented series UID, a model "
                   "(name:vN or name:production) or an evaluation id")
    p.add_argument("--home", default=None)
    p.set_defaults(func=cmd_lineage)

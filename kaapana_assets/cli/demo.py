"""`kaapana demo`: the whole story on the embedded defaults (see kaapana_assets.demo)."""

from __future__ import annotations

import argparse

from kaapana_assets.cli.common import SubParsers, console


def cmd_demo(args: argparse.Namespace) -> int:
    from kaapana_assets.demo import run_demo

    return run_demo(console, sites=args.sites, studies=args.studies, seed=args.seed, rounds=args.rounds,
                    new_studies=args.new_studies, grid={"slices": args.slices, "matrix": args.matrix},
                    schedule=args.schedule, promotion_dice=args.promotion_dice, local_epochs=args.local_epochs)


def add_parsers(sub: SubParsers) -> None:
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
    p.add_argument("--local-epochs", type=int, default=2, help="epochs each site trains per round")
    p.add_argument("--promotion-dice", type=float, default=0.7,
                   help="cross-site Dice the federated model needs to become production (demo: 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

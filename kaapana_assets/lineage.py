"""Lineage of a result, from a SEG back to the pixels it was learned from:

  SEG (or series) → model version → federated rounds or training run → cohort name and
  version → Delta versions it read → source series and SOP Instance UIDs.

Federated lineage stops at the site boundary on purpose: the hub knows which sites took
part and how many cases each contributed; a site's cohort version and members are read
here only for the site whose lake this is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.training.tracking import Tracking


class LineageNotFound(LookupError):
    pass


@dataclass
class Node:
    label: str
    children: list[Node] = field(default_factory=list)

    def add(self, label: str) -> Node:
        child = Node(label)
        self.children.append(child)
        return child

    def lines(self, depth: int = 0) -> list[str]:
        return ["  " * depth + self.label] + [line for c in self.children for line in c.lines(depth + 1)]


def _series_node(parent: Node, lake: Lake, series_uid: str, label: str, show: int = 3) -> None:
    sops = lake.read("instances", pl.col("series_uid") == series_uid).sort("instance_number")["sop_instance_uid"]
    node = parent.add(f"{label} {series_uid}: {len(sops)} SOP instance(s)")
    for sop in sops.head(show).to_list():
        node.add(f"SOP {sop}")
    if len(sops) > show:
        node.add(f"… {len(sops) - show} more (kaapana cohort show / the instances table)")


def _cohort_node(parent: Node, lake: Lake, cohort: str, version: int, label: str) -> None:
    members = lake.read("cohort_members", (pl.col("cohort") == cohort) & (pl.col("cohort_version") == version))
    if not members.height:
        parent.add(f"{label}: cohort {cohort} v{version} is not in this lake")
        return
    first = members.row(0, named=True)
    node = parent.add(f"{label}: cohort {cohort} v{version}, {members.height} series, membership "
                      f"{first['membership_hash'][:12]}")
    node.add(f"Delta versions read: series v{first['series_table_version']}, tags v{first['tags_table_version']}")
    for series_uid in members.sort("series_uid")["series_uid"].to_list():
        _series_node(node, lake, series_uid, "source series")


def _segmentation(lake: Lake, uid: str) -> dict:
    if not lake.exists("segmentations"):
        raise LineageNotFound("this site has no segmentations yet")
    rows = lake.read("segmentations", (pl.col("seg_sop_instance_uid") == uid) | (pl.col("seg_series_uid") == uid)
                     | (pl.col("series_uid") == uid))
    if not rows.height:
        raise LineageNotFound(f"{uid} is neither a SEG SOP Instance UID, a SEG series UID nor a segmented series here")
    return rows.sort("created_at").row(-1, named=True)


def trace(home: KaapanaHome, tracking: Tracking, uid: str) -> Node:
    lake = Lake(home.lake)
    seg = _segmentation(lake, uid)
    root = Node(f"SEG {seg['seg_sop_instance_uid']} (series {seg['seg_series_uid']}, study {seg['study_uid']})")
    name, version = seg["model_name"], str(seg["model_version"])
    model = root.add(f"model {name} v{version}")
    try:
        mv = tracking.client().get_model_version(name, version)
        tags = dict(mv.tags or {})
    except Exception as exc:  # noqa: BLE001 - an imported or foreign model may not be registered here
        model.add(f"not in this site's registry: {exc}")
        tags = {}
    if tags.get("kaapana.source") == "federated":
        _federated(model, home, lake, tags)
    elif tags.get("kaapana.cohort"):
        run = model.add(f"training run {mv.run_id} (MLflow)")
        params = tracking.client().get_run(mv.run_id).data.params if mv.run_id else {}
        deltas = {k.removeprefix("delta_version."): v for k, v in params.items() if k.startswith("delta_version.")}
        if deltas:
            run.add("Delta versions read: " + ", ".join(f"{k} v{v}" for k, v in sorted(deltas.items())))
        _cohort_node(run, lake, tags["kaapana.cohort"], int(tags.get("kaapana.cohort_version", 0)), "trained on")
    elif tags:
        model.add(f"registered without training lineage (imported): {tags.get('kaapana.source', 'unknown source')}")
    _series_node(root, lake, seg["series_uid"], "segmented series")
    return root


def _federated(model: Node, home: KaapanaHome, lake: Lake, tags: dict[str, str]) -> None:
    experiment = tags["kaapana.federated_experiment"]
    node = model.add(f"federated experiment {experiment}: {tags.get('kaapana.rounds')} round(s), strategy "
                     f"{tags.get('kaapana.strategy')}, plan {tags.get('kaapana.plan_sha256', '')[:12]}, "
                     f"global weights {tags.get('kaapana.global_sha256', '')[:12]}")
    if lake.exists("federated_rounds"):
        rows = lake.read("federated_rounds", pl.col("experiment") == experiment).sort(["round", "site"])
        for round_ in sorted(set(rows["round"].to_list())):
            these = rows.filter(pl.col("round") == round_)
            aggregated = these.filter(pl.col("status") == "aggregated")
            glob = these.filter(pl.col("site") == "global")
            dice = glob["dice"][0] if glob.height else None
            others = these.filter(pl.col("status").is_in(["failed", "rejected"]))
            node.add(f"round {round_}: " + ", ".join(f"{r['site']} ({r['cases']} cases)"
                                                     for r in aggregated.iter_rows(named=True))
                     + (f"; not aggregated: {', '.join(f'{s} ({why})' for s, why in zip(others['site'], others['reason'], strict=True))}"
                        if others.height else "")
                     + (f"; global Dice {dice:.3f}" if dice is not None else ""))
    cases = json.loads(tags.get("kaapana.cases", "{}"))
    cohort = node.add(f"cohort {tags.get('kaapana.cohort')} at each site: "
                      + ", ".join(f"{site} {n} cases" for site, n in cases.items()))
    record = Path(home.root) / "nnunet" / "federated" / experiment / "cohort.json"
    if record.exists():
        mine = json.loads(record.read_text())
        _cohort_node(cohort, lake, mine["cohort"], int(mine["version"]), "this site")
    cohort.add("other sites: cohort versions and members stay at the sites (only counts left them)")

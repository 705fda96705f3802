"""Lineage of a result, from a SEG back to the pixels it was learned from:

  SEG (or series) → model version → federated rounds or training run → cohort name and
  version → Delta versions it read → source series and SOP Instance UIDs.

A model version also shows the cohort versions it was evaluated on (the `evaluations`
table); an evaluation id traces to its cohort version, its model and its cases.

Federated lineage stops at the site boundary on purpose: the hub knows which sites took
part and how many cases each contributed; a site's cohort version and members are read
here only for the site whose lake this is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from kaapana_assets.home import KaapanaHome
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import (
    COHORT_MEMBERS,
    EVALUATIONS,
    FEDERATED_ROUNDS,
    FEDERATED_SITE_ROUNDS,
    INSTANCES,
    SEGMENTATIONS,
)
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.projects.assignment import projects_of_series
from kaapana_assets.projects.membership import DEFAULT_PROJECT
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


def _series_node(parent: Node, lake: Lake, series_uid: str, label: str, show: int = 3,
                 version: int | None = None) -> None:
    """A series and its SOP instances, as `instances` lists them at `version` (a cohort version's
    pinned slices), or now."""
    sops = lake.read(INSTANCES, pl.col("series_uid") == series_uid, version=version).sort(
        "instance_number")["sop_instance_uid"]
    node = parent.add(f"{label} {series_uid}: {len(sops)} SOP instance(s)")
    for sop in sops.head(show).to_list():
        node.add(f"SOP {sop}")
    if len(sops) > show:
        node.add(f"… {len(sops) - show} more (kaapana cohort show / the instances table)")


def _cohort_node(parent: Node, lake: Lake, cohort: str, version: int, label: str) -> None:
    members = lake.read(COHORT_MEMBERS, (pl.col("cohort") == cohort) & (pl.col("cohort_version") == version))
    if not members.height:
        parent.add(f"{label}: cohort {cohort} v{version} is not in this lake")
        return
    first = members.row(0, named=True)
    project = first.get("project") or DEFAULT_PROJECT
    node = parent.add(f"{label}: cohort {cohort} v{version} of project {project}, {members.height} series, "
                      f"membership {first['membership_hash'][:12]}")
    pinned = first.get("instances_table_version")
    scope = first.get("series_projects_table_version")
    node.add(f"Delta versions read: series v{first['series_table_version']}, tags v{first['tags_table_version']}"
             + (f", instances v{pinned}" if pinned is not None else "")
             + (f", series_projects v{scope}" if scope is not None else ""))
    for series_uid in members.sort("series_uid")["series_uid"].to_list():
        _series_node(node, lake, series_uid, "source series", version=pinned)


def _segmentation(lake: Lake, uid: str) -> dict:
    if not lake.exists(SEGMENTATIONS):
        raise LineageNotFound("this site has no segmentations yet")
    rows = lake.read(SEGMENTATIONS, (pl.col("seg_sop_instance_uid") == uid) | (pl.col("seg_series_uid") == uid)
                     | (pl.col("series_uid") == uid))
    if not rows.height:
        raise LineageNotFound(f"{uid} is neither a SEG SOP Instance UID, a SEG series UID nor a segmented series here")
    return rows.sort("created_at").row(-1, named=True)


MODEL_REF = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*):(?:v(?P<version>\d+)|(?P<alias>[A-Za-z][A-Za-z0-9_-]*))")


def trace(home: KaapanaHome, tracking: Tracking, uid: str, lake: Lake | None = None) -> Node:
    """The lineage of a SEG (SOP Instance UID, SEG series UID or segmented series UID), of a
    model version (`name:vN`, or `name:production` for an alias) or of an evaluation (its id).
    `lake`: where the home's tables live, when not in its own folder (an object store)."""
    lake = lake or Lake(home.lake)
    evaluation = _evaluation(lake, uid)
    if evaluation is not None:
        return _evaluation_trace(home, lake, tracking, evaluation)
    ref = MODEL_REF.fullmatch(uid)
    if ref:
        name, version = ref["name"], ref["version"]
        if version is None:
            found = find_version(tracking, name, alias=ref["alias"])
            if found is None:
                raise LineageNotFound(f"no version of model {name} holds the alias {ref['alias']!r}")
            version = str(found.version)
        try:
            found = find_version(tracking, name, version)
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read
            raise LineageNotFound(f"model {name} v{version} is not in this site's registry: {exc}") from None
        if found is None:
            raise LineageNotFound(f"model {name} v{version} is not in this site's registry")
        root = Node(f"model {name} v{version}")
        _model_lineage(root, home, lake, tracking, name, version)
        return root
    seg = _segmentation(lake, uid)
    root = Node(f"SEG {seg['seg_sop_instance_uid']} (series {seg['seg_series_uid']}, study {seg['study_uid']})")
    name, version = seg["model_name"], str(seg["model_version"])
    _model_lineage(root.add(f"model {name} v{version}"), home, lake, tracking, name, version)
    _series_node(root, lake, seg["series_uid"], "segmented series")
    projects = projects_of_series(lake, [seg["series_uid"]]).get(seg["series_uid"], [])
    root.add(f"project(s) of the segmented series: {', '.join(projects) or 'none'}")
    return root


def _model_lineage(model: Node, home: KaapanaHome, lake: Lake, tracking: Tracking, name: str, version: str,
                   evaluations: bool = True) -> None:
    """Under a model version's node: how it was made (federated rounds or a training run, down
    to cohort versions and source UIDs) and the cohort versions it was evaluated on."""
    # An imported or foreign model may not be registered here.
    try:
        mv = find_version(tracking, name, version)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read
        model.add(f"not in this site's registry: {exc}")
        mv = None
    else:
        if mv is None:
            model.add(f"not in this site's registry: model {name} has no version {version}")
    tags = dict(mv.tags or {}) if mv is not None else {}
    if tags.get("kaapana.source") == "federated":
        _federated(model, home, lake, tags)
    elif tags.get("kaapana.cohort") and mv is not None:
        run = model.add(f"training run {mv.run_id} (MLflow)")
        params = tracking.client().get_run(mv.run_id).data.params if mv.run_id else {}
        deltas = {k.removeprefix("delta_version."): v for k, v in params.items() if k.startswith("delta_version.")}
        if deltas:
            run.add("Delta versions read: " + ", ".join(f"{k} v{v}" for k, v in sorted(deltas.items())))
        _cohort_node(run, lake, tags["kaapana.cohort"], int(tags.get("kaapana.cohort_version", 0)), "trained on")
    elif tags:
        model.add(f"registered without training lineage (imported): {tags.get('kaapana.source', 'unknown source')}")
    if evaluations and lake.exists(EVALUATIONS):
        rows = lake.read(EVALUATIONS, (pl.col("model_name") == name) & (pl.col("model_version") == version))
        for ident in rows.sort("cohort", "cohort_version")["evaluation_id"].unique(maintain_order=True).to_list():
            these = rows.filter(pl.col("evaluation_id") == ident)
            first = these.row(0, named=True)
            model.add(f"evaluated on cohort {first['cohort']} v{first['cohort_version']} (evaluation {ident}): "
                      f"{these['series_uid'].n_unique()} case(s), {_dice_text(these)}")


def _dice_text(rows: pl.DataFrame) -> str:
    means = rows.group_by("label", "label_value").agg(pl.col("dice").drop_nans().mean()).sort("label_value")
    return "mean Dice " + ", ".join(f"{label} {dice:.3f}" if dice is not None else f"{label} —"
                                    for label, dice in zip(means["label"], means["dice"], strict=True))


def _evaluation(lake: Lake, uid: str) -> pl.DataFrame | None:
    if not re.fullmatch(r"[0-9a-f]{16}", uid) or not lake.exists(EVALUATIONS):
        return None
    rows = lake.read(EVALUATIONS, pl.col("evaluation_id") == uid)
    return rows.sort("series_uid", "label_value") if rows.height else None


def _evaluation_trace(home: KaapanaHome, lake: Lake, tracking: Tracking, rows: pl.DataFrame) -> Node:
    first = rows.row(0, named=True)
    name, version = first["model_name"], str(first["model_version"])
    root = Node(f"evaluation {first['evaluation_id']}: model {name} v{version} on cohort {first['cohort']} "
                f"v{first['cohort_version']}, {rows['series_uid'].n_unique()} case(s), {_dice_text(rows)}")
    _cohort_node(root, lake, first["cohort"], int(first["cohort_version"]), "measured on")
    _model_lineage(root.add(f"model {name} v{version}"), home, lake, tracking, name, version, evaluations=False)
    cases = root.add("cases")
    for series_uid in rows["series_uid"].unique(maintain_order=True).to_list():
        these = rows.filter(pl.col("series_uid") == series_uid)
        case = these.row(0, named=True)
        scores = "; ".join(f"{r['label']} Dice {_fmt(r['dice'], 3)}, HD95 {_fmt(r['hd95_mm'], 1, ' mm')}"
                           for r in these.iter_rows(named=True))
        node = cases.add(f"series {series_uid}: {scores}")
        # Each label from the reference the cohort version recorded for it (cohorts/references.py).
        sources: dict[str, list[str]] = {}
        for r in these.iter_rows(named=True):
            sources.setdefault(r["reference_seg_series_uid"] or "none (scored as absent)", []).append(r["label"])
        for seg_series, labels in sources.items():
            node.add(f"reference SEG series {seg_series}: {', '.join(labels)}")
        node.add(f"predicted SEG {case['predicted_seg_sop_instance_uid']} (series {case['predicted_seg_series_uid']})")
    return root


def _fmt(value: float | None, digits: int, unit: str = "") -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}{unit}"


def _federated(model: Node, home: KaapanaHome, lake: Lake, tags: dict[str, str]) -> None:
    experiment = tags["kaapana.federated_experiment"]
    node = model.add(f"federated experiment {experiment}: {tags.get('kaapana.rounds')} round(s), strategy "
                     f"{tags.get('kaapana.strategy')}, plan {tags.get('kaapana.plan_sha256', '')[:12]}, "
                     f"global weights {tags.get('kaapana.global_sha256', '')[:12]}")
    if lake.exists(FEDERATED_ROUNDS):
        rows = lake.read(FEDERATED_ROUNDS, pl.col("experiment") == experiment).sort(["round", "site"])
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
    # This site's own record of the rounds it trained (federated_site_rounds), else its export's note.
    trained = (lake.read(FEDERATED_SITE_ROUNDS, pl.col("experiment") == experiment)
               if lake.exists(FEDERATED_SITE_ROUNDS) else pl.DataFrame())
    record = Path(home.root) / "nnunet" / "federated" / experiment / "cohort.json"
    if trained.height:
        for name, version in sorted(set(trained.select("cohort", "cohort_version").iter_rows())):
            _cohort_node(cohort, lake, name, int(version), "this site")
    elif record.exists():
        mine = json.loads(record.read_text())
        _cohort_node(cohort, lake, mine["cohort"], int(mine["version"]), "this site")
    cohort.add("other sites: cohort versions and members stay at the sites (only counts left them)")

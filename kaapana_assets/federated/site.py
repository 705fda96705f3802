"""The site side of a federated experiment: everything here runs at the site, against the
site's own lake and archive, reads what the hub sent from the site's own federation folder
(the ClientApp verified it and put it there) and leaves what it will send in the outbox.

  compute_fingerprint  export the cohort locally, summarise it (aggregates only)
  train_update         preprocess with the hub's plans, train from global r-1 (tensors, counts, metrics)
  train_baseline       the same plan, initial network and schedule, trained at this site alone
  evaluate_global      score global r on the site's own validation patients (metrics only)

Every payload passes the identifier guard before it reaches the outbox; the ClientApp
signs it and the guard runs once more on the Flower message that leaves.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from kaapana_assets import nnunet
from kaapana_assets.cohorts.membership import read_cohort
from kaapana_assets.federated.fingerprint import site_fingerprint
from kaapana_assets.federation.channel import metric_name
from kaapana_assets.federation.guard import assert_nothing_identifying
from kaapana_assets.federation.payload import SiteUpdate, pack_update
from kaapana_assets.federation.store import FederationStore, checked_name
from kaapana_assets.lake import Lake
from kaapana_assets.lake.digest import row_digest
from kaapana_assets.lake.schemas import FEDERATED_SITE_ROUNDS
from kaapana_assets.training.export import export_cohort

DATASET_ID = 1  # each experiment has its own nnU-Net root at the site, so one id suffices
DATASET = nnunet.dataset_name(DATASET_ID, "Federated")


@dataclass(frozen=True)
class SiteContext:
    """What a site step needs: who it is and its own data."""

    site: str
    store: FederationStore
    lake: Lake
    archive_root: Path
    work_root: Path  # the site's nnU-Net work folder
    device: nnunet.Device | str = nnunet.Device.AUTO
    threads: int = 2
    log: Callable[[str], None] = print

    def paths(self, experiment: str) -> nnunet.NnunetPaths:
        return nnunet.NnunetPaths(self.work_root / "federated" / checked_name("experiment", experiment))

    def raw(self, experiment: str) -> Path:
        return self.paths(experiment).raw / DATASET

    def send(self, experiment: str, round_: int, kind: str, payload: bytes, cases: int) -> str:
        """Guard, then leave the payload in the outbox for the ClientApp; returns its sha256."""
        assert_nothing_identifying(payload, self.lake)
        self.store.write_message(experiment, round_, kind, self.site, payload)
        return hashlib.sha256(payload).hexdigest()


def compute_fingerprint(ctx: SiteContext, experiment: str) -> dict[str, object]:
    """Export the site's cohort (latest version) to nnU-Net's raw format, locally, and send
    its fingerprint: aggregates only (see fingerprint.py)."""
    spec = ctx.store.read_json(experiment, "experiment")
    snapshot = read_cohort(ctx.lake, spec["cohort"])
    raw = ctx.raw(experiment)
    # Export beside, then swap: a failed export leaves the previous one intact.
    raw.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=raw.parent))
    exported = export_cohort(ctx.lake, ctx.archive_root, snapshot, staging / DATASET, list(spec["labels"]))
    if raw.exists():
        shutil.rmtree(raw)
    (staging / DATASET).rename(raw)
    shutil.rmtree(staging, ignore_errors=True)
    # Site-local record of what the experiment trains on (never sent).
    (ctx.paths(experiment).root / "cohort.json").write_text(json.dumps(
        {"cohort": snapshot.cohort, "version": snapshot.version, "members": snapshot.size}))
    fingerprint = site_fingerprint(raw, ctx.site)
    sha = ctx.send(experiment, 0, "fingerprint", fingerprint.to_json().encode(), fingerprint.cases)
    ctx.log(f"{ctx.site}: fingerprint of {fingerprint.cases} cases (cohort {snapshot.cohort} v{snapshot.version}) sent")
    return {"cases": fingerprint.cases, "cohort": snapshot.cohort, "cohort_version": snapshot.version,
            "labels": list(exported.labels), "sha256": sha}


def prepare_site(paths: nnunet.NnunetPaths, raw_dataset: Path, dataset_id: int, plans: dict, fingerprint: dict,
                 processes: int = 1) -> None:
    """Preprocess the site's dataset with the common plans (renamed for its dataset) and
    the global fingerprint they were made from."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    folder = paths.preprocessed / raw_dataset.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{nnunet.PLANS}.json").write_text(json.dumps({**plans, "dataset_name": raw_dataset.name}, indent=2))
    (folder / "dataset.json").write_text((raw_dataset / "dataset.json").read_text())
    (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))
    with nnunet.nnunet_environment(paths, threads=processes):
        preprocess_dataset(dataset_id, nnunet.PLANS, configurations=(nnunet.CONFIGURATION,),
                           num_processes=[processes], verbose=False, show_progress_bar=False)


def _split(raw_dataset: Path) -> dict[str, list[str]]:
    cases = json.loads((raw_dataset / "cases.json").read_text())
    return nnunet.patient_split([(c["case"], c["patient_id"]) for c in cases])


def local_update(site: str, paths: nnunet.NnunetPaths, raw_dataset: Path, dataset_id: int, global_weights: dict,
                 schedule: nnunet.Schedule, device: nnunet.Device | str = nnunet.Device.CPU,
                 threads: int = 2) -> SiteUpdate:
    """Train from the global weights on the site's training split."""
    # The hub's plans fix the network; a site must not change its width.
    schedule = dataclasses.replace(schedule, base_features=None)
    split = _split(raw_dataset)
    result = nnunet.train(paths, dataset_id, schedule, split, device, threads, initial_weights=global_weights)
    checkpoint = torch.load(result.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    last = result.epochs[-1] if result.epochs else {}
    metrics: dict[str, float] = {k: float(last[k]) for k in ("train_loss", "val_loss", "pseudo_dice") if k in last and last[k] == last[k]}
    return SiteUpdate(site, len(split["train"]), checkpoint["network_weights"], metrics)


def _plans_digest(plans: dict) -> str:
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


def training_seed(experiment_seed: int, round_: int, site: str) -> int:
    """The seed of one site's local training in one round: fixed by the experiment's seed, so
    that a rerun trains the same network, and different per round and site, so that sites and
    rounds do not draw the same patches."""
    digest = hashlib.sha256(f"{experiment_seed}/{round_}/{site}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _prepared(ctx: SiteContext, experiment: str) -> Path:
    """The site's export, preprocessed with the hub's plans (once per plan); its raw folder."""
    raw = ctx.raw(experiment)
    if not (raw / "cases.json").exists():
        raise FileNotFoundError(f"{ctx.site} has no export for {experiment}: site_fingerprint must run first")
    plans = ctx.store.read_json(experiment, "plans")
    paths = ctx.paths(experiment)
    marker = paths.preprocessed / DATASET / ".kaapana-plans"
    if not marker.exists() or marker.read_text() != _plans_digest(plans):
        ctx.log(f"{ctx.site}: preprocessing with the hub's plans")
        prepare_site(paths, raw, DATASET_ID, plans, ctx.store.read_json(experiment, "fingerprint"))
        marker.write_text(_plans_digest(plans))
    return raw


def train_baseline(ctx: SiteContext, experiment: str, initial: dict[str, torch.Tensor]) -> SiteUpdate:
    """This site's local-only baseline for cross-site evaluation: the experiment's plan, its
    initial network and its schedule, trained here alone for as many local epochs as the
    site trained in all the experiment's rounds together (the same steps, no averaging)."""
    raw = _prepared(ctx, experiment)
    spec = ctx.store.read_json(experiment, "experiment")
    schedule = nnunet.Schedule(**spec["schedule"])
    schedule = dataclasses.replace(schedule, epochs=schedule.epochs * int(spec["rounds"]),
                                   seed=training_seed(int(spec.get("seed", 0)), 0, ctx.site))
    ctx.log(f"{ctx.site}: local baseline of {experiment}, {schedule.epochs} epochs × "
            f"{schedule.iterations_per_epoch} iterations")
    return local_update(ctx.site, ctx.paths(experiment), raw, DATASET_ID, initial, schedule, ctx.device, ctx.threads)


def train_update(ctx: SiteContext, experiment: str, round_: int) -> dict[str, object]:
    """Round r at this site: train from global r-1, send the sealed update."""
    raw = _prepared(ctx, experiment)
    spec = ctx.store.read_json(experiment, "experiment")
    paths = ctx.paths(experiment)
    start = ctx.store.read_global(experiment, round_ - 1)
    seed = training_seed(int(spec.get("seed", 0)), round_, ctx.site)
    schedule = dataclasses.replace(nnunet.Schedule(**spec["schedule"]), seed=seed)
    ctx.log(f"{ctx.site}: round {round_}, {schedule.epochs} local epochs × {schedule.iterations_per_epoch} "
            f"iterations, seed {seed}")
    update = local_update(ctx.site, paths, raw, DATASET_ID, start, schedule, ctx.device, ctx.threads)
    record_round(ctx, experiment, round_, update.cases)
    sha = ctx.send(experiment, round_, "update", pack_update(update.weights, update.cases, update.metrics), update.cases)
    return {"cases": update.cases, **update.metrics, "seed": seed, "sha256": sha}


def record_round(ctx: SiteContext, experiment: str, round_: int, cases: int) -> None:
    """The site's own record that it trained round r on its export's cohort version (in its
    lake, never sent): an evaluation here holds the federated model's test cohort to it."""
    exported = json.loads((ctx.paths(experiment).root / "cohort.json").read_text())
    row = {"experiment": experiment, "round": round_, "site": ctx.site, "cohort": exported["cohort"],
           "cohort_version": int(exported["version"]), "cases": cases}
    row = {**row, "row_digest": row_digest(row), "trained_at": dt.datetime.now(dt.timezone.utc)}
    ctx.lake.merge(FEDERATED_SITE_ROUNDS, pa.Table.from_pylist([row], schema=FEDERATED_SITE_ROUNDS.schema))


def evaluate_global(ctx: SiteContext, experiment: str, round_: int) -> dict[str, float]:
    """Score global r on this site's validation patients; only the Dice values leave."""
    raw = ctx.raw(experiment)
    plans = ctx.store.read_json(experiment, "plans")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    labels = {k: v for k, v in dataset_json["labels"].items() if v}
    weights = ctx.store.read_global(experiment, round_)
    val = _split(raw)["val"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = nnunet.model_folder_from_weights(Path(tmp) / "model", plans, dataset_json, weights)
        scores = nnunet.evaluate(nnunet.load_predictor(folder, ctx.device), raw, val, labels)
    metrics = {metric_name(k): v for k, v in scores.items() if v == v}
    ctx.send(experiment, round_, "evaluation", pack_update({}, len(val), metrics), len(val))
    ctx.log(f"{ctx.site}: global model of round {round_} on {len(val)} validation case(s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {"cases": float(len(val)), **metrics}

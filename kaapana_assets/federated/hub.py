"""The hub side of a federated experiment: publish the experiment, plan from the sites'
fingerprints, verify and aggregate sealed updates, combine cross-site metrics. Plain
Python; the assets decide when, the transports decide how sites are reached."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import torch

from kaapana_assets.federated.aggregation import STRATEGIES, QuorumNotMet, require_quorum
from kaapana_assets.federated.exchange import Manifest, RejectionReason, UpdateRejected, open_sealed
from kaapana_assets.federated.fingerprint import SiteFingerprint, aggregate_fingerprints, plan_at_hub
from kaapana_assets.federated.payload import PayloadError, SiteUpdate, unpack_update
from kaapana_assets.federated.site import metric_name
from kaapana_assets.federated.store import ExchangeStore, checked_name
from kaapana_assets.lake.digest import row_digest
from kaapana_assets.training import nnunet

HUB_DATASET_ID = 900


@dataclass(frozen=True)
class ExperimentSpec:
    """What every site is told (published as experiment.json; no site data in it)."""

    experiment: str
    cohort: str
    labels: list[str]
    rounds: int
    min_sites: int
    strategy: str
    schedule: dict
    seed: int = 0

    def __post_init__(self) -> None:
        checked_name("experiment", self.experiment)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; one of {sorted(STRATEGIES)}")
        if self.rounds < 1 or self.min_sites < 1:
            raise ValueError("rounds and min_sites must be at least 1")


@dataclass
class Rejection:
    site: str
    reason: RejectionReason
    message: str


@dataclass
class Opened:
    accepted: dict[str, tuple[Manifest, bytes]] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)


def publish_experiment(store: ExchangeStore, spec: ExperimentSpec) -> None:
    store.write_json(spec.experiment, "experiment", asdict(spec))


def open_envelopes(store: ExchangeStore, experiment: str, round_: int, kind: str, keys: Mapping[str, str],
                   sites: Sequence[str]) -> Opened:
    """Verify each expected site's envelope with that site's key. Anything tampered, foreign,
    replayed or missing is rejected with its reason, never used."""
    opened = Opened()
    for site in sites:
        envelope = store.read_envelope(experiment, round_, kind, site)
        if envelope is None:
            opened.rejected.append(Rejection(site, RejectionReason.MISSING, f"no {kind} from {site} for round {round_}"))
            continue
        try:
            opened.accepted[site] = open_sealed(envelope, keys[site], experiment, round_, site)
        except UpdateRejected as exc:
            opened.rejected.append(Rejection(site, exc.reason, exc.message))
    return opened


def collect_fingerprints(store: ExchangeStore, experiment: str, keys: Mapping[str, str],
                         sites: Sequence[str]) -> tuple[list[SiteFingerprint], list[Rejection]]:
    opened = open_envelopes(store, experiment, 0, "fingerprint", keys, sites)
    fingerprints, rejected = [], list(opened.rejected)
    for site, (manifest, payload) in opened.accepted.items():
        try:
            fingerprint = SiteFingerprint.from_json(payload.decode())
        except (ValueError, TypeError) as exc:
            rejected.append(Rejection(site, RejectionReason.BAD_PAYLOAD, f"unreadable fingerprint: {exc}"))
            continue
        if fingerprint.site != site or fingerprint.cases != manifest.cases:
            rejected.append(Rejection(site, RejectionReason.BAD_PAYLOAD, "fingerprint disagrees with its manifest"))
            continue
        fingerprints.append(fingerprint)
    return fingerprints, rejected


def collect_updates(store: ExchangeStore, experiment: str, round_: int, kind: str, keys: Mapping[str, str],
                    sites: Sequence[str]) -> tuple[list[SiteUpdate], list[Rejection]]:
    opened = open_envelopes(store, experiment, round_, kind, keys, sites)
    updates, rejected = [], list(opened.rejected)
    for site, (manifest, payload) in opened.accepted.items():
        try:
            update = unpack_update(site, payload)
        except PayloadError as exc:
            rejected.append(Rejection(site, RejectionReason.BAD_PAYLOAD, str(exc)))
            continue
        if update.cases != manifest.cases:
            rejected.append(Rejection(site, RejectionReason.BAD_PAYLOAD, "case count disagrees with the manifest"))
            continue
        updates.append(update)
    return updates, rejected


@dataclass
class Plan:
    plans: dict
    dataset_json: dict
    fingerprint: dict
    cases: dict[str, int]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.plans, sort_keys=True).encode()).hexdigest()

    @property
    def patch_size(self) -> list[int]:
        return self.plans["configurations"][nnunet.CONFIGURATION]["patch_size"]

    @property
    def features(self) -> list[int]:
        return self.plans["configurations"][nnunet.CONFIGURATION]["architecture"]["arch_kwargs"]["features_per_stage"]


def plan_experiment(store: ExchangeStore, spec: ExperimentSpec, fingerprints: list[SiteFingerprint],
                    work: Path) -> Plan:
    """One global fingerprint, one plan, one initial network — published for every site.
    Raises FederationError when sites disagree on labels or channels."""
    fingerprint = aggregate_fingerprints(fingerprints)
    paths = nnunet.NnunetPaths(work)
    name = nnunet.dataset_name(HUB_DATASET_ID, spec.experiment)
    with nnunet.nnunet_environment(paths):
        plans = plan_at_hub(fingerprint, fingerprints, paths.raw / name, paths.preprocessed / name, HUB_DATASET_ID)
    plans = nnunet.with_width(plans, spec.schedule.get("base_features"))
    first = fingerprints[0]
    dataset_json = {"channel_names": first.channel_names, "labels": first.labels,
                    "numTraining": sum(f.cases for f in fingerprints), "file_ending": ".nii.gz",
                    "description": f"federated experiment {spec.experiment}"}
    store.write_json(spec.experiment, "fingerprint", fingerprint)
    store.write_json(spec.experiment, "plans", plans)
    store.write_json(spec.experiment, "dataset", dataset_json)
    # Made once, here, and distributed: averaging independently initialised networks fails.
    store.write_global(spec.experiment, 0, nnunet.initial_network_weights(plans, dataset_json, seed=spec.seed))
    return Plan(plans, dataset_json, fingerprint, {f.site: f.cases for f in fingerprints})


def aggregate(updates: list[SiteUpdate], expected: Sequence[str], min_sites: int,
              strategy: str) -> dict[str, torch.Tensor]:
    """Quorum first (QuorumNotMet: nothing aggregated), then the strategy."""
    require_quorum(updates, expected, min_sites)
    return STRATEGIES[strategy](updates)


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def combined_metrics(evaluations: list[SiteUpdate]) -> dict[str, float]:
    """Cross-site metrics: each one weighted by the validation cases of the sites reporting it."""
    combined = {}
    for name in sorted({k for e in evaluations for k in e.metrics}):
        reporting = [e for e in evaluations if name in e.metrics]
        combined[name] = sum(e.metrics[name] * e.cases for e in reporting) / sum(e.cases for e in reporting)
    return combined


class SiteRunLike(Protocol):
    ok: bool
    message: str


RunSites = Callable[[str, list[str]], Mapping[str, SiteRunLike]]  # (site asset, sites) -> outcome per site


class RoundSuperseded(RuntimeError):
    """A later round was built on this one: recomputing it would orphan that lineage."""


class RoundFailed(RuntimeError):
    """Below quorum: nothing aggregated. `rows` record what happened, for the table."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


@dataclass
class RoundOutcome:
    round: int
    global_sha256: str
    aggregated: list[str]
    rejected: list[Rejection]
    evaluations: dict[str, dict[str, float]]
    metrics: dict[str, float]  # cross-site, weighted by validation cases
    rows: list[dict]


def _row(spec: ExperimentSpec, round_: int, site: str, status: str, plan_sha: str, **values: object) -> dict:
    row = {"experiment": spec.experiment, "round": round_, "site": site, "status": status, "reason": None,
           "message": None, "cases": None, "train_loss": None, "val_cases": None, "dice": None,
           "update_sha256": None, "global_sha256": None, "plan_sha256": plan_sha, "strategy": spec.strategy,
           "committed_at": dt.datetime.now(dt.timezone.utc)}
    row.update(values)
    # Rows go to Delta and to Dagster metadata: plain str, not the StrEnum (Dagster's serdes
    # refuses enums it does not know).
    return {k: str(v) if isinstance(v, StrEnum) else v for k, v in row.items()}


def with_digests(rows: list[dict]) -> list[dict]:
    """row_digest over the content (not the time), so an unchanged re-run commits nothing."""
    return [{**row, "row_digest": row_digest(row)} for row in rows]


def run_round(store: ExchangeStore, spec: ExperimentSpec, round_: int, participants: list[str],
              keys: Mapping[str, str], min_sites: int, run_sites: RunSites, log: Callable[[str], None],
              warn: Callable[[str], None]) -> RoundOutcome:
    """One round: sites train from global r-1 → verify → quorum → aggregate → publish global
    r → every site scores it on its own validation patients. Raises RoundFailed below quorum
    (global r is then not written, so re-materializing the round resumes the experiment)."""
    if not store.has_global(spec.experiment, round_ - 1):
        raise FileNotFoundError(f"round {round_} needs the global model of round {round_ - 1}: "
                                f"materialize {spec.experiment}|{round_ - 1} first")
    if store.has_global(spec.experiment, round_ + 1):
        raise RoundSuperseded(f"round {round_ + 1} of {spec.experiment} was trained from this round's model; "
                              f"recomputing round {round_} would break that lineage — start a new experiment")
    plan_sha = hashlib.sha256(json.dumps(store.read_json(spec.experiment, "plans"), sort_keys=True).encode()).hexdigest()
    runs = run_sites("site_update", participants)
    ran = [site for site in participants if runs[site].ok]
    updates, rejected = collect_updates(store, spec.experiment, round_, "update", keys, ran)
    for site in participants:
        if not runs[site].ok:
            rejected.append(Rejection(site, RejectionReason.SITE_FAILED, runs[site].message))
    for rejection in rejected:
        warn(f"{rejection.site}: update not aggregated ({rejection.reason}): {rejection.message}")
    rows = [_row(spec, round_, r.site, "failed" if r.reason == RejectionReason.SITE_FAILED else "rejected", plan_sha,
                 reason=r.reason, message=r.message[:500]) for r in rejected]
    for update in updates:
        payload = store.read_envelope(spec.experiment, round_, "update", update.site) or b""
        rows.append(_row(spec, round_, update.site, "aggregated", plan_sha, cases=update.cases,
                         train_loss=update.metrics.get("train_loss"),
                         update_sha256=json.loads(payload.partition(b"\n")[0])["sha256"]))
    try:
        weights = aggregate(updates, participants, min_sites, spec.strategy)
    except QuorumNotMet as exc:
        raise RoundFailed(str(exc), with_digests(rows)) from None
    global_sha = weights_digest(weights)
    store.write_global(spec.experiment, round_, weights)
    log(f"round {round_}: {spec.strategy} over {', '.join(u.site for u in updates)} "
        f"({sum(u.cases for u in updates)} cases) → global {global_sha[:12]}")

    evaluated = run_sites("site_evaluation", participants)
    ok = [site for site in participants if evaluated[site].ok]
    evaluations, eval_rejected = collect_updates(store, spec.experiment, round_, "evaluation", keys, ok)
    for r in eval_rejected:
        warn(f"{r.site}: evaluation not used ({r.reason}): {r.message}")
    for site in participants:
        if not evaluated[site].ok:
            warn(f"{site}: could not evaluate the global model: {evaluated[site].message}")
    by_site = {e.site: e for e in evaluations}
    main = metric_name(spec.labels[0])
    for row in rows:
        if row["site"] in by_site:
            row["val_cases"] = by_site[row["site"]].cases
            row["dice"] = by_site[row["site"]].metrics.get(main)
    for site, evaluation in by_site.items():  # a site whose update failed may still have scored the model
        if not any(row["site"] == site for row in rows):
            rows.append(_row(spec, round_, site, "failed", plan_sha, val_cases=evaluation.cases,
                             dice=evaluation.metrics.get(main)))
    metrics = combined_metrics(evaluations)
    rows.append(_row(spec, round_, "global", "global", plan_sha, cases=sum(u.cases for u in updates),
                     val_cases=sum(e.cases for e in evaluations), dice=metrics.get(main), global_sha256=global_sha))
    return RoundOutcome(round_, global_sha, [u.site for u in updates], rejected,
                        {e.site: e.metrics for e in evaluations}, metrics, with_digests(rows))

"""The hub side of a federated experiment: plan from the sites' fingerprints, run a round
over a channel to the sites (Flower's, see steps.py), quorum, aggregation with a
Flower strategy, cross-site metrics. Plain Python; the assets decide when, the ServerApp
carries the messages."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import torch

from kaapana_assets import nnunet
from kaapana_assets.federated.aggregation import QuorumNotMet, aggregate_round, require_quorum
from kaapana_assets.federated.fingerprint import SiteFingerprint, aggregate_fingerprints, plan_at_hub
from kaapana_assets.federated.strategy import Strategy
from kaapana_assets.federation.channel import Rejection, RejectionReason, Verified, metric_name
from kaapana_assets.federation.store import FederationStore, checked_name
from kaapana_assets.lake.digest import row_digest

HUB_DATASET_ID = 900


@dataclass(frozen=True)
class Privacy:
    """Client-side differential privacy (Flower's local DP: clip the update to
    `clipping_norm`, add Gaussian noise for (epsilon, delta)); off when clipping_norm is 0.
    `max_epsilon`: the experiment's budget over all its rounds at `delta` (accounting.py);
    None: counted, never refused."""

    clipping_norm: float = 0.0
    sensitivity: float = 1.0
    epsilon: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise ValueError(f"max_epsilon must be positive, not {self.max_epsilon}")
        if self.max_epsilon is not None and not self.enabled:
            raise ValueError("a privacy budget (max_epsilon) needs local DP: set a clipping norm > 0")

    @classmethod
    def calibrated(cls, clipping_norm: float, noise_multiplier: float, delta: float,
                   max_epsilon: float | None = None) -> Privacy:
        """The settings whose noise per weight is `noise_multiplier` × `clipping_norm`: the
        sensitivity is the clipping norm, and ε per round follows from the multiplier."""
        if not clipping_norm > 0 or not noise_multiplier > 0:
            raise ValueError(f"clipping norm {clipping_norm} and noise multiplier {noise_multiplier} must be > 0")
        return cls(clipping_norm=clipping_norm, sensitivity=clipping_norm, delta=delta, max_epsilon=max_epsilon,
                   epsilon=math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier)

    @property
    def enabled(self) -> bool:
        return self.clipping_norm > 0

    @property
    def noise_stdv(self) -> float:
        """σ of the noise added to each weight: Flower's LocalDpMod formula."""
        return float(self.sensitivity * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon)


@dataclass(frozen=True)
class ExperimentSpec:
    """What every site is told (no site data in it)."""

    experiment: str
    cohort: str
    labels: list[str]
    rounds: int
    min_sites: int
    strategy: Strategy  # a name (config, the published JSON) is parsed on construction
    schedule: dict
    seed: int = 0
    privacy: dict = field(default_factory=dict)  # Privacy's fields; empty: off
    server_momentum: float = 0.0  # fedavgm: the hub's momentum over the rounds' mean updates

    def __post_init__(self) -> None:
        checked_name("experiment", self.experiment)
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy))
        if self.strategy is Strategy.FEDAVGM and not 0 < self.server_momentum < 1:
            raise ValueError(f"fedavgm needs a server momentum in (0, 1), not {self.server_momentum}")
        if self.strategy is not Strategy.FEDAVGM and self.server_momentum:
            raise ValueError(f"server momentum is fedavgm's; {self.strategy} has none")
        if self.rounds < 1 or self.min_sites < 1:
            raise ValueError("rounds and min_sites must be at least 1")
        Privacy(**self.privacy)  # unknown fields fail here, not at the sites

    @property
    def dp(self) -> Privacy:
        return Privacy(**self.privacy)

    @property
    def aggregation(self) -> dict[str, str | float]:
        """The strategy and its settings, as the metadata and MLflow show them."""
        return {"strategy": str(self.strategy), **({"server_momentum": self.server_momentum} if self.server_momentum else {})}


def publish_experiment(store: FederationStore, spec: ExperimentSpec) -> None:
    store.write_json(spec.experiment, "experiment", asdict(spec))


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


def plan_experiment(store: FederationStore, spec: ExperimentSpec, fingerprints: list[SiteFingerprint],
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


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class SiteChannel(Protocol):
    """How a round reaches its sites: send, wait, verify. Failures come back as rejections."""

    def train(self, sites: list[str], round_: int,
              weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]: ...

    def evaluate(self, sites: list[str], round_: int,
                 weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]: ...


def combined_metrics(evaluations: list[Verified]) -> dict[str, float]:
    """Cross-site metrics: each one weighted by the validation cases of the sites reporting it."""
    combined = {}
    for name in sorted({k for e in evaluations for k in e.metrics}):
        reporting = [e for e in evaluations if name in e.metrics]
        combined[name] = sum(e.metrics[name] * e.cases for e in reporting) / sum(e.cases for e in reporting)
    return combined


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
           "epsilon": None, "committed_at": dt.datetime.now(dt.timezone.utc)}
    row.update(values)
    # Rows go to Delta and to Dagster metadata: plain str, not the StrEnum (Dagster's serdes
    # refuses enums it does not know).
    return {k: str(v) if isinstance(v, StrEnum) else v for k, v in row.items()}


def with_digests(rows: list[dict], epsilons: Mapping[str, float] | None = None) -> list[dict]:
    """row_digest over the content (not the time), so an unchanged re-run commits nothing.
    `epsilons`: each site's ε so far (the global row: the largest), when the round is private."""
    if epsilons:
        rows = [{**row, "epsilon": max(epsilons.values()) if row["site"] == "global" else epsilons.get(row["site"])}
                for row in rows]
    return [{**row, "row_digest": row_digest(row)} for row in rows]


def run_round(store: FederationStore, spec: ExperimentSpec, round_: int, participants: list[str], min_sites: int,
              channel: SiteChannel, log: Callable[[str], None], warn: Callable[[str], None]) -> RoundOutcome:
    """One round: sites train from global r-1 → verify → quorum → aggregate → publish global
    r → every site scores it on its own validation patients. Raises RoundFailed below quorum
    (global r is then not written, so re-materializing the round resumes the experiment)."""
    if not store.has_global(spec.experiment, round_ - 1):
        raise FileNotFoundError(f"round {round_} needs the global model of round {round_ - 1}: "
                                f"materialize {spec.experiment}|{round_ - 1} first")
    if store.has_global(spec.experiment, round_ + 1):
        raise RoundSuperseded(f"round {round_ + 1} of {spec.experiment} was trained from this round's model; "
                              f"recomputing round {round_} would break that lineage — start a new experiment")
    # dp-accounting (and scipy) load in the rounds that count a budget, not in every import of the hub.
    from kaapana_assets.federated import accounting

    privacy = spec.dp
    mechanism = accounting.round_mechanism(privacy) if privacy.enabled else None
    budget = accounting.budget_of(privacy) if privacy.enabled else None
    if mechanism is not None and budget is not None:  # the asset checked already; this run refuses as well
        accounting.check_round(accounting.read_releases(store, spec.experiment), spec.experiment, round_,
                               participants, mechanism, budget)
    plan_sha = hashlib.sha256(json.dumps(store.read_json(spec.experiment, "plans"), sort_keys=True).encode()).hexdigest()
    start = store.read_global(spec.experiment, round_ - 1)
    updates, rejected = channel.train(participants, round_, start)
    epsilons: dict[str, float] = {}
    if mechanism is not None:
        # Every update that reached the hub spent privacy, aggregated or not; a site without a reply spent nothing.
        released = [u.site for u in updates] + [r.site for r in rejected if r.reason != RejectionReason.SITE_FAILED]
        ledger = accounting.record_releases(store, spec.experiment,
                                            [accounting.Release(site, round_, mechanism) for site in released])
        epsilons = accounting.spent(ledger, participants, privacy.delta)
    for rejection in rejected:
        warn(f"{rejection.site}: update not aggregated ({rejection.reason}): {rejection.message}")
    rows = [_row(spec, round_, r.site, "failed" if r.reason == RejectionReason.SITE_FAILED else "rejected", plan_sha,
                 reason=r.reason, message=r.message[:500]) for r in rejected]
    for update in updates:
        rows.append(_row(spec, round_, update.site, "aggregated", plan_sha, cases=update.cases,
                         train_loss=update.metrics.get("train_loss"), update_sha256=update.sha256))
    try:
        require_quorum([u.site for u in updates], participants, min_sites)
    except QuorumNotMet as exc:
        raise RoundFailed(str(exc), with_digests(rows, epsilons)) from None
    mu = float(spec.schedule.get("proximal_mu") or 0.0)
    momentum = None
    if spec.strategy is Strategy.FEDAVGM and round_ > 1:
        momentum = store.read_momentum(spec.experiment, round_ - 1)
    result = aggregate_round([u.message for u in updates if u.message is not None], round_, spec.strategy, mu, start,
                             spec.server_momentum, momentum)
    weights = result.weights
    global_sha = weights_digest(weights)
    if result.momentum is not None:  # before global r: a resumed round r + 1 finds it
        store.write_momentum(spec.experiment, round_, result.momentum)
    store.write_global(spec.experiment, round_, weights)
    log(f"round {round_}: {spec.strategy} over {', '.join(u.site for u in updates)} "
        f"({sum(u.cases for u in updates)} cases) → global {global_sha[:12]}")

    evaluations, eval_rejected = channel.evaluate(participants, round_, weights)
    for r in eval_rejected:
        warn(f"{r.site}: evaluation not used ({r.reason}): {r.message}")
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
                        {e.site: e.metrics for e in evaluations}, metrics, with_digests(rows, epsilons))

"""Federated training's steps on the federation's transport, registered by name (see
kaapana_assets/federation/registry.py):

  plan   hub: every site's fingerprint (aggregates only), verified; planning runs in the asset
         site: compute the fingerprint (fingerprint_request)
  round  hub: from global r-1 to global r (hub.run_round over RoundChannel)
         site: train from global r-1 (train), score global r (evaluate)
  baseline  hub: the initial network to every site; consenting sites' local models kept (cross-site)
         site: train a local-only baseline if the site consented (node config share-local-model),
               else decline (baseline; no Dagster run)
  evaluation  hub: each model of an evaluation request to every site, their aggregates checked
         site: the model on the site's own held-out cohort (site_evaluation.py), aggregates
               only, small cells suppressed (model_evaluation; no Dagster run)

At the site this is the wiring layer (as assets.py is the hub's): what the hub's message
carries is verified with the site's key and put into the site's own federation folder, and
the site's participation is *materialized into the site's own Dagster instance*
(site_fingerprint, site_update, site_evaluation), so the site's UI and lineage show every
round it took part in. The reply carries only tensors, counts and metrics and is signed
with the site's key; the ClientApp's identifier guard checks it before it leaves.

Imported by kaapana_assets/flower_apps.py only (the ServerApp's and ClientApp's processes):
never by the code location, which loads neither torch nor Flower."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.typing import ConfigRecordValues

from kaapana_assets.federated.fingerprint import SiteFingerprint
from kaapana_assets.federated.step_names import BASELINE_STEP, EVALUATION_STEP, PLAN_STEP, ROUND_STEP
from kaapana_assets.federation.channel import (
    ARRAYS,
    CONFIG,
    METRICS,
    Kind,
    Rejection,
    RejectionReason,
    UpdateRejected,
    Verified,
    from_arrays,
    full_arrays,
    metrics_record,
    read_manifest,
    seal,
    verify,
    weight_records,
    weights_of,
)
from kaapana_assets.federation.clientapp import SiteSettings, reply
from kaapana_assets.federation.guard import MAX_THRESHOLD
from kaapana_assets.federation.registry import Step, register_step
from kaapana_assets.federation.serverapp import GridChannel, HubRun
from kaapana_assets.federation.store import checked_name

if TYPE_CHECKING:
    import torch

    from kaapana_assets.federated.hub import ExperimentSpec
    from kaapana_assets.federated.site import SiteContext

EXPERIMENTS = "federated_experiments"  # the site's partitions of its federated assets
# What the site handlers import when they run (kaapana-superexec imports it ahead).
SITE_IMPORTS = (
    "dagster",
    "kaapana_assets.federated.assets",
    "resources.federation",
    "resources.storage",
    "kaapana_assets.federated.hub",
    "kaapana_assets.federation.payload",
    "kaapana_assets.federated.privacy",
    "kaapana_assets.federated.site",
    "kaapana_assets.federated.site_evaluation",
    "nnunetv2.experiment_planning.plan_and_preprocess_api",
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
)

# -- hub ------------------------------------------------------------------------------------------


def checked_weights(verified: list[Verified], rejected: list[Rejection],
                    weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]:
    """The verified replies whose arrays are a state dict of the experiment's network (same
    names, same shapes as `weights`), with every name restored; the others rejected."""
    accepted = []
    for update in verified:
        assert update.message is not None
        try:
            arrays = full_arrays(update.message.content) if ARRAYS in update.message.content else None
        except ValueError as exc:
            rejected.append(Rejection(update.site, RejectionReason.BAD_PAYLOAD, str(exc)))
            continue
        if arrays is None or set(arrays.keys()) != set(weights):
            rejected.append(Rejection(update.site, RejectionReason.BAD_PAYLOAD,
                                      "the update is not a state dict of the experiment's network"))
            continue
        bad = [k for k in weights if tuple(arrays[k].shape) != tuple(weights[k].shape)]
        if bad:
            rejected.append(Rejection(update.site, RejectionReason.BAD_PAYLOAD, f"tensor {bad[0]} has shape "
                                      f"{tuple(arrays[bad[0]].shape)}, expected {tuple(weights[bad[0]].shape)}"))
            continue
        # Verified already: the strategies now see every name of the state dict.
        update.message.content[ARRAYS] = arrays
        accepted.append(update)
    return accepted, rejected


class RoundChannel:
    """hub.SiteChannel over the Grid: what a round sends with the weights."""

    def __init__(self, grid_channel: GridChannel, spec: ExperimentSpec, published: Mapping[str, dict]):
        self.channel, self.spec = grid_channel, spec
        # What every site needs besides the weights, published by federated_plan.
        self.config = {name: json.dumps(value, sort_keys=True) for name, value in published.items()}

    def _content(self, weights: Mapping[str, torch.Tensor]) -> Callable[[str], RecordDict]:
        records = weight_records(weights)
        return lambda site: RecordDict({**records, CONFIG: ConfigRecord(dict(self.config))})

    def train(self, sites: list[str], round_: int,
              weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]:
        verified, rejected = self.channel.exchange(Kind.TRAIN, Kind.UPDATE, sites, round_, self._content(weights))
        return checked_weights(verified, rejected, weights)

    def evaluate(self, sites: list[str], round_: int,
                 weights: Mapping[str, torch.Tensor]) -> tuple[list[Verified], list[Rejection]]:
        return self.channel.exchange(Kind.EVALUATE, Kind.EVALUATION, sites, round_, self._content(weights))


def plan_step(run: HubRun) -> dict:
    """Every site's fingerprint (aggregates only), verified; planning itself runs in the asset."""
    spec = json.dumps(run.store.read_json(run.settings.experiment, "experiment"), sort_keys=True)
    verified, rejected = run.channel().exchange(
        Kind.FINGERPRINT_REQUEST, Kind.FINGERPRINT, run.sites, 0,
        lambda site: RecordDict({CONFIG: ConfigRecord({"experiment": spec})}))
    fingerprints = {}
    for answer in verified:
        assert answer.message is not None
        try:
            fingerprint = SiteFingerprint.from_json(str(answer.message.content[CONFIG]["fingerprint"]))
        except (KeyError, ValueError, TypeError) as exc:
            rejected.append(Rejection(answer.site, RejectionReason.BAD_PAYLOAD, f"unreadable fingerprint: {exc}"))
            continue
        if fingerprint.site != answer.site or fingerprint.cases != answer.cases:
            rejected.append(Rejection(answer.site, RejectionReason.BAD_PAYLOAD,
                                      "fingerprint disagrees with its manifest"))
            continue
        fingerprints[answer.site] = fingerprint.to_json()
    return {"ok": True, "fingerprints": fingerprints, "rejected": [r.to_json() for r in rejected]}


def _rows(rows: list[dict]) -> list[dict]:
    return [{k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()} for row in rows]


def round_step(run: HubRun) -> dict:
    from kaapana_assets.federated.accounting import BudgetExceeded
    from kaapana_assets.federated.hub import ExperimentSpec, RoundFailed, RoundSuperseded, run_round

    store, experiment = run.store, run.settings.experiment
    spec = ExperimentSpec(**store.read_json(experiment, "experiment"))
    participants = store.read_json(experiment, "participants")["sites"]
    published = {name: store.read_json(experiment, name) for name in ("experiment", "plans", "fingerprint", "dataset")}
    try:
        outcome = run_round(store, spec, run.settings.round, participants, spec.min_sites,
                            RoundChannel(run.channel(), spec, published), run.log, run.log)
    except RoundFailed as exc:
        return {"ok": False, "error": str(exc), "kind": "below_quorum", "rows": _rows(exc.rows)}
    except (FileNotFoundError, RoundSuperseded, BudgetExceeded) as exc:
        return {"ok": False, "error": str(exc), "kind": "refused", "rows": []}
    return {"ok": True, "round": outcome.round, "global_sha256": outcome.global_sha256,
            "aggregated": outcome.aggregated, "rejected": [r.to_json() for r in outcome.rejected],
            "evaluations": outcome.evaluations, "metrics": outcome.metrics, "rows": _rows(outcome.rows)}


# -- site -----------------------------------------------------------------------------------------
# The training steps import Dagster, nnU-Net's helpers and the hub's modules when they run:
# a ClientApp process starts per message, and a statistics request needs none of them.

def materialize_at_site(settings: SiteSettings, asset: str, experiment: str, partition_key: str) -> None:
    """Run one site asset in the site's own Dagster instance (<home>/dagster); raise with
    the step's error when it fails (the hub receives the message)."""
    import dagster as dg

    from kaapana_assets.federated.assets import SITE_ASSETS
    from resources.build import site_resources
    from resources.federation import FederatedSiteResource

    home = settings.home
    if not home.exists():
        raise RuntimeError(f"site home {home} does not exist")
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    (home / "dagster" / "dagster.yaml").touch()  # the site instance: sqlite storage beside it
    resources = {**site_resources(home, site=settings.site, lake=settings.site_lake(),
                                  device=settings.device, threads=settings.threads),
                 "federated_site": FederatedSiteResource(name=settings.site, folder=str(settings.store.root))}
    instance = dg.DagsterInstance.local_temp(str(home / "dagster"))
    try:
        if not instance.has_dynamic_partition(EXPERIMENTS, experiment):
            instance.add_dynamic_partitions(EXPERIMENTS, [experiment])
        result = dg.materialize([SITE_ASSETS[asset]], partition_key=partition_key, instance=instance,
                                resources=resources, raise_on_error=False,
                                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                                tags={"kaapana/federated": "true", "kaapana/site": settings.site})
        if not result.success:
            failures = [e.step_failure_data.error.message.strip() for e in result.get_step_failure_events()
                        if e.step_failure_data.error]
            raise RuntimeError(f"{asset}[{partition_key}] failed at {settings.site} (run {result.run_id}): "
                               + (failures[0][:500] if failures else "see the site's Dagster UI"))
    finally:
        instance.dispose()


def _receive(settings: SiteSettings, msg: Message, kind: Kind) -> tuple[str, int]:
    """Verify a message from the hub and put what it carries into the site's folder."""
    manifest, _ = read_manifest(msg.content)
    try:
        verify(msg.content, settings.key, kind, manifest.experiment, manifest.round, settings.site)
    except UpdateRejected as exc:
        raise RuntimeError(f"{settings.site} refuses the hub's {kind}: {exc.reason}: {exc.message}") from None
    experiment, round_ = checked_name("experiment", manifest.experiment), manifest.round
    store, config = settings.store, msg.content[CONFIG]
    for name in ("experiment", "plans", "fingerprint", "dataset"):
        if name in config:
            store.write_json(experiment, name, json.loads(str(config[name])))
    if ARRAYS in msg.content:
        # The weights this site trains from (or scores) are the ones the hub signed.
        store.write_global(experiment, round_ - 1 if kind == Kind.TRAIN else round_, weights_of(msg.content))
    return experiment, round_


def fingerprint(settings: SiteSettings, msg: Message) -> Message:
    experiment, _ = _receive(settings, msg, Kind.FINGERPRINT_REQUEST)
    materialize_at_site(settings, "site_fingerprint", experiment, experiment)
    payload = settings.store.read_message(experiment, 0, "fingerprint", settings.site).decode()
    cases = int(json.loads(payload)["cases"])
    content = RecordDict({CONFIG: ConfigRecord({"fingerprint": payload})})
    return reply(msg, seal(content, Kind.FINGERPRINT, experiment, 0, settings.site, cases, settings.key))


def train(settings: SiteSettings, msg: Message) -> Message:
    from kaapana_assets.federated.hub import ExperimentSpec
    from kaapana_assets.federated.partitions import round_key
    from kaapana_assets.federated.privacy import privatize
    from kaapana_assets.federation.payload import unpack_update

    experiment, round_ = _receive(settings, msg, Kind.TRAIN)
    materialize_at_site(settings, "site_update", experiment, round_key(experiment, round_))
    update = unpack_update(settings.site, settings.store.read_message(experiment, round_, "update", settings.site))
    spec = ExperimentSpec(**settings.store.read_json(experiment, "experiment"))
    weights = update.weights
    if spec.dp.enabled:  # Flower's local DP: clip the update, add Gaussian noise, before anything leaves
        weights = privatize(weights, settings.store.read_global(experiment, round_ - 1), spec.dp)
    content = RecordDict({**weight_records(weights), METRICS: metrics_record(update.cases, update.metrics)})
    return reply(msg, seal(content, Kind.UPDATE, experiment, round_, settings.site, update.cases, settings.key))


def evaluate(settings: SiteSettings, msg: Message) -> Message:
    from kaapana_assets.federated.partitions import round_key
    from kaapana_assets.federation.payload import unpack_update

    experiment, round_ = _receive(settings, msg, Kind.EVALUATE)
    materialize_at_site(settings, "site_evaluation", experiment, round_key(experiment, round_))
    evaluation = unpack_update(settings.site, settings.store.read_message(experiment, round_, "evaluation",
                                                                           settings.site))
    content = RecordDict({METRICS: metrics_record(evaluation.cases, evaluation.metrics)})
    return reply(msg, seal(content, Kind.EVALUATION, experiment, round_, settings.site, evaluation.cases,
                           settings.key))


PUBLISHED = ("experiment", "plans", "fingerprint", "dataset")  # what a site needs of an experiment besides weights


def evaluation_step(run: HubRun) -> dict:
    """Each model of the evaluation request to every site, one exchange per model; every
    answer checked (aggregates only, nothing in the clear below the threshold)."""
    from kaapana_assets.federated.evaluation_hub import read_request
    from kaapana_assets.federated.site_evaluation import GLOBAL, EvaluationRefused, parse_evaluation

    store, experiment = run.store, run.settings.experiment
    request = read_request(store, experiment, run.settings.round)
    published = {name: json.dumps(store.read_json(experiment, name), sort_keys=True) for name in PUBLISHED}
    channel = run.channel()
    answers: dict[str, dict[str, dict]] = {}
    rejected: list[dict] = []
    for model in request.models:
        weights = (store.read_global(experiment, request.round) if model == GLOBAL
                   else store.read_local(experiment, model))
        records = weight_records(weights)
        body = json.dumps({"cohort": request.cohort, "model": model, "round": request.round,
                           "threshold": request.threshold}, sort_keys=True)
        verified, refused = channel.exchange(
            Kind.MODEL_EVALUATION_REQUEST, Kind.MODEL_EVALUATION, run.sites, request.message_round(model),
            lambda site, records=records, body=body: RecordDict(  # type: ignore[misc]
                {**records, CONFIG: ConfigRecord({"request": body, **published})}))
        for answer in verified:
            assert answer.message is not None
            config = answer.message.content[CONFIG]
            if "refused" in config:
                refused.append(Rejection(answer.site, RejectionReason.REFUSED, str(config["refused"])[:500]))
                continue
            try:
                evaluation = parse_evaluation(str(config["evaluation"]), answer.site, model, request.threshold)
            except (KeyError, EvaluationRefused) as exc:
                refused.append(Rejection(answer.site, RejectionReason.BAD_PAYLOAD, f"evaluation refused: {exc}"))
                continue
            answers.setdefault(model, {})[answer.site] = evaluation.to_json()
        for rejection in refused:
            run.log(f"{model} model at {rejection.site}: {rejection.reason}: {rejection.message}")
            rejected.append({"model": model, **rejection.to_json()})
    return {"ok": True, "evaluations": answers, "rejected": rejected}


def baseline_step(run: HubRun) -> dict:
    """The experiment's initial network to every site; each consenting site trains its local
    baseline and sends it, the others decline. The hub keeps each baseline it verified."""
    store, experiment = run.store, run.settings.experiment
    initial = store.read_global(experiment, 0)
    published = {name: json.dumps(store.read_json(experiment, name), sort_keys=True) for name in PUBLISHED}
    records = weight_records(initial)
    verified, rejected = run.channel().exchange(
        Kind.BASELINE_REQUEST, Kind.BASELINE, run.sites, run.settings.round,
        lambda site: RecordDict({**records, CONFIG: ConfigRecord(dict(published))}))
    declined = {}
    for answer in list(verified):
        assert answer.message is not None
        if CONFIG in answer.message.content and "declined" in answer.message.content[CONFIG]:
            declined[answer.site] = str(answer.message.content[CONFIG]["declined"])[:500]
            verified.remove(answer)
    accepted, rejected = checked_weights(verified, rejected, initial)
    for baseline in accepted:
        assert baseline.message is not None
        # checked_weights restored every name in place: the record is the full state dict now.
        store.write_local(experiment, baseline.site, from_arrays(baseline.message.content.array_records[ARRAYS]))
        run.log(f"{baseline.site}: local baseline of {baseline.cases} training cases kept")
    for rejection in rejected:
        run.log(f"{rejection.site}: no local baseline ({rejection.reason}): {rejection.message}")
    return {"ok": True, "trained": {b.site: b.cases for b in accepted}, "declined": declined,
            "rejected": [r.to_json() for r in rejected]}


def baseline(settings: SiteSettings, msg: Message) -> Message:
    """Train this site's local-only baseline from the hub's initial network, if the site
    consented to share it (its weights go to every other site through the hub); else decline."""
    from kaapana_assets.federated.site import train_baseline

    manifest, _ = read_manifest(msg.content)
    try:
        verify(msg.content, settings.key, Kind.BASELINE_REQUEST, manifest.experiment, manifest.round, settings.site)
    except UpdateRejected as exc:
        raise RuntimeError(f"{settings.site} refuses the hub's baseline request: {exc.reason}: {exc.message}") from None
    experiment = checked_name("experiment", manifest.experiment)
    if not settings.share_local_model:
        content = RecordDict({CONFIG: ConfigRecord({"declined": f"{settings.site} does not share a local model "
                                                                "(node config share-local-model is off)"})})
        return reply(msg, seal(content, Kind.BASELINE, experiment, manifest.round, settings.site, 0, settings.key))
    config = msg.content[CONFIG]
    for name in PUBLISHED:
        settings.store.write_json(experiment, name, json.loads(str(config[name])))
    update = train_baseline(site_context(settings), experiment, weights_of(msg.content))
    content = RecordDict({**weight_records(update.weights), METRICS: metrics_record(update.cases, update.metrics)})
    return reply(msg, seal(content, Kind.BASELINE, experiment, manifest.round, settings.site, update.cases,
                           settings.key))


def site_context(settings: SiteSettings) -> SiteContext:
    """The site's own data as its Dagster resources would give it (resources/build.py)."""
    from kaapana_assets.federated.site import SiteContext
    from kaapana_assets.home import KaapanaHome

    home = KaapanaHome(settings.home)
    return SiteContext(settings.site, settings.store, settings.site_lake(), home.archive, settings.home / "nnunet",
                       settings.device, settings.threads)


def model_evaluation(settings: SiteSettings, msg: Message) -> Message:
    """A model on this site's own held-out cohort: the held-out check (a refusal says how
    many patients overlap, never which), per-case metrics kept here, aggregates sent."""
    from kaapana_assets.evaluation.held_out import NotHeldOut
    from kaapana_assets.federated.site_evaluation import evaluate_at_site

    manifest, _ = read_manifest(msg.content)
    try:
        verify(msg.content, settings.key, Kind.MODEL_EVALUATION_REQUEST, manifest.experiment, manifest.round,
               settings.site)
    except UpdateRejected as exc:
        raise RuntimeError(f"{settings.site} refuses the hub's evaluation request: {exc.reason}: {exc.message}") from None
    experiment, config = checked_name("experiment", manifest.experiment), msg.content[CONFIG]
    for name in PUBLISHED:
        settings.store.write_json(experiment, name, json.loads(str(config[name])))
    request = json.loads(str(config["request"]))
    requested = request.get("threshold")
    if not isinstance(requested, int) or isinstance(requested, bool) or not 1 <= requested <= MAX_THRESHOLD:
        raise RuntimeError(f"{settings.site} refuses an evaluation request with threshold {requested!r}")
    try:
        evaluation = evaluate_at_site(site_context(settings), experiment, checked_name("cohort", request["cohort"]),
                                      checked_name("model", request["model"]), int(request["round"]),
                                      weights_of(msg.content), max(requested, settings.min_cell_size))
        answer: dict[str, ConfigRecordValues] = {"evaluation": evaluation.dumps()}
    except NotHeldOut as exc:
        answer = {"refused": str(exc)}
    # The manifest's case count is 0: a count there would bypass the suppression.
    return reply(msg, seal(RecordDict({CONFIG: ConfigRecord(answer)}), Kind.MODEL_EVALUATION, experiment,
                           manifest.round, settings.site, 0, settings.key))


PLAN = register_step(Step(PLAN_STEP, hub=plan_step, site={Kind.FINGERPRINT_REQUEST: fingerprint},
                          preload=SITE_IMPORTS))
ROUND = register_step(Step(ROUND_STEP, hub=round_step, site={Kind.TRAIN: train, Kind.EVALUATE: evaluate},
                           numbered=True, preload=SITE_IMPORTS))
BASELINE = register_step(Step(BASELINE_STEP, hub=baseline_step, site={Kind.BASELINE_REQUEST: baseline},
                              preload=SITE_IMPORTS))
EVALUATION = register_step(Step(EVALUATION_STEP, hub=evaluation_step,
                                site={Kind.MODEL_EVALUATION_REQUEST: model_evaluation}, preload=SITE_IMPORTS))

__all__ = ["BASELINE", "EVALUATION", "PLAN", "ROUND", "RoundChannel", "baseline", "baseline_step", "checked_weights",
           "evaluate", "evaluation_step", "fingerprint",
           "materialize_at_site", "model_evaluation", "plan_step", "round_step", "site_context", "train"]

"""Federated training as assets. Hub side: federated_plan[experiment] →
federated_rounds[experiment|round] → federated_model[experiment]; each plan and each round
materialization starts exactly one Flower run on the hub's SuperLink (serverapp.py), whose
result it records. Site side (materialized at each site into the site's own Dagster
instance by the site's ClientApp): site_fingerprint, site_update, site_evaluation.

Round r reads global r-1 from the hub's federation folder; Dagster cannot express a round
depending on the previous round of the same asset (self-dependencies need time
partitions), so the round checks it and the federated_round_chain sensor
(sensors/federated_rounds.py) requests r+1 after r succeeds.
"""

import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl
import pyarrow as pa

from kaapana_assets import nnunet
from kaapana_assets.federated.fingerprint import SiteFingerprint
from kaapana_assets.federated.partitions import experiments_partitions, rounds_partitions
from kaapana_assets.federated.step_names import BASELINE_STEP, EVALUATION_STEP, PLAN_STEP, ROUND_STEP
from kaapana_assets.federated.strategy import Strategy
from kaapana_assets.federation.runs import FlowerRunFailed
from kaapana_assets.federation.store import FederationStore
from kaapana_assets.files import write_atomically
from kaapana_assets.lake.schemas import CROSS_SITE_EVALUATIONS, FEDERATED_EVALUATIONS, FEDERATED_ROUNDS
from kaapana_assets.metadata_table import columns, table
from kaapana_assets.training.k8s import GPU_POOL
from kaapana_assets.training.tracking import model_name_for
from resources.federation import FederatedSiteResource, FederationResource
from resources.location import GPU_OP_TAGS
from resources.mlflow import MlflowResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource, LakeResource

# The hub's and the sites' federation modules bring torch and Flower (≈1.5 s of imports):
# they load inside the federated assets' bodies, not in every run of the code location.
if TYPE_CHECKING:
    from kaapana_assets.federated.evaluation_hub import EvaluationRequest
    from kaapana_assets.federated.hub import ExperimentSpec
    from kaapana_assets.federated.site import SiteContext
    from kaapana_assets.federated.site_evaluation import ModelEvaluation

SITE_GROUP = "federated_site"
HUB_GROUP = "federated"
ROUND_SCHEMA = columns(
    ("site", "string"), ("status", "string"), ("cases", "int"), ("train_loss", "float"),
    ("dice", "float", "Dice on the site's own validation patients"), ("reason", "string"),
    ("epsilon", "float", "ε the site has spent so far (differential privacy)"),
)
EVALUATION_SCHEMA = columns(
    ("site", "string"), ("label", "string"), ("metric", "string"),
    ("reported", "string", "cases measured; \"<5\" when suppressed"), ("mean", "float"), ("median", "float"),
    ("q1", "float"), ("q3", "float"), ("minimum", "float"), ("maximum", "float"),
)
MATRIX_SCHEMA = columns(
    ("data_site", "string"), ("model_owner", "string"), ("label", "string"), ("metric", "string"),
    ("value", "float", "mean over the data site's held-out cases"), ("reported", "string", "cases; \"<5\" when suppressed"),
)
VERDICT_SCHEMA = columns(("site", "string"), ("global_value", "float"), ("own_value", "float"),
                         ("global_not_worse", "bool"), ("reason", "string"))
DICE_BY_ROUND_SCHEMA = columns(("round", "int"), ("dice", "float", "global Dice across the sites"))


def _site_context(context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource,
                  nnunet_settings: NnunetResource, federated_site: FederatedSiteResource) -> "SiteContext":
    return federated_site.context(lake.lake(), archive.kaapana_home().archive, nnunet_settings, context.log.info)


def _metadata(values: Mapping[str, object]) -> dict[str, dg.MetadataValue]:
    """The site modules' plain values as metadata, typed the way Dagster would infer them."""
    def value(v: object) -> dg.MetadataValue:
        if isinstance(v, bool):
            return dg.MetadataValue.bool(v)
        if isinstance(v, int):
            return dg.MetadataValue.int(v)
        if isinstance(v, float):
            return dg.MetadataValue.float(v)
        if isinstance(v, list | dict):
            return dg.MetadataValue.json(v)
        return dg.MetadataValue.text(str(v))

    return {k: value(v) for k, v in values.items()}


def _round(context: dg.AssetExecutionContext) -> tuple[str, int]:
    # Rounds are multi-partitioned (experiment × round); the key carries both dimensions.
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):
        raise dg.Failure(description=f"{key!r} is not an experiment|round partition")
    dims = key.keys_by_dimension
    return dims["experiment"], int(dims["round"])


# -- site side -------------------------------------------------------------------------------

@dg.asset(partitions_def=experiments_partitions, group_name=SITE_GROUP, kinds={"nnunet"},
          description="At a site (materialized by the site's Flower ClientApp): export its own cohort locally "
                      "and leave its nnU-Net fingerprint (aggregates only) for the reply to the hub.")
def site_fingerprint(context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource,
                     nnunet_settings: NnunetResource, federated_site: FederatedSiteResource) -> dg.MaterializeResult:
    from kaapana_assets.federated.site import compute_fingerprint

    summary = compute_fingerprint(_site_context(context, lake, archive, nnunet_settings, federated_site),
                                  context.partition_key)
    return dg.MaterializeResult(metadata=_metadata(summary), data_version=dg.DataVersion(str(summary["sha256"])[:16]))


@dg.asset(partitions_def=rounds_partitions, group_name=SITE_GROUP, kinds={"nnunet", "pytorch"},
          op_tags=GPU_OP_TAGS, pool=GPU_POOL,
          description="At a site (materialized by the site's Flower ClientApp): train N local epochs from the "
                      "hub's signed global weights on the site's own cohort; weights, case count and metrics "
                      "go back in the signed reply.")
def site_update(context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource,
                nnunet_settings: NnunetResource, federated_site: FederatedSiteResource) -> dg.MaterializeResult:
    from kaapana_assets.federated.site import train_update

    experiment, round_ = _round(context)
    summary = train_update(_site_context(context, lake, archive, nnunet_settings, federated_site), experiment, round_)
    return dg.MaterializeResult(metadata=_metadata(summary), data_version=dg.DataVersion(str(summary["sha256"])[:16]))


@dg.asset(partitions_def=rounds_partitions, group_name=SITE_GROUP, kinds={"nnunet"},
          description="At a site: score the round's global model on the site's own validation patients; "
                      "only the Dice values leave.")
def site_evaluation(context: dg.AssetExecutionContext, lake: LakeResource, archive: ArchiveResource,
                    nnunet_settings: NnunetResource, federated_site: FederatedSiteResource) -> dg.MaterializeResult:
    from kaapana_assets.federated.site import evaluate_global

    experiment, round_ = _round(context)
    metrics = evaluate_global(_site_context(context, lake, archive, nnunet_settings, federated_site),
                              experiment, round_)
    return dg.MaterializeResult(metadata=metrics)


SITE_ASSETS = {"site_fingerprint": site_fingerprint, "site_update": site_update, "site_evaluation": site_evaluation}


# -- hub side --------------------------------------------------------------------------------

def _spec(experiment: str, federation: FederationResource) -> "ExperimentSpec":
    from kaapana_assets.federated.hub import ExperimentSpec

    strategy = federation.aggregation_strategy()
    return ExperimentSpec(experiment=experiment, cohort=federation.cohort, labels=list(federation.labels),
                          rounds=federation.rounds, min_sites=federation.min_sites, strategy=strategy,
                          schedule=dict(federation.training_schedule().__dict__), seed=federation.seed,
                          privacy=federation.privacy(),
                          server_momentum=federation.server_momentum if strategy is Strategy.FEDAVGM else 0.0)


def _flower_step(federation: FederationResource, step: str, experiment: str, round_: int,
                 context: dg.AssetExecutionContext) -> dict:
    try:
        return federation.run_step(step, experiment, round_, context.log.info)
    except FlowerRunFailed as exc:
        raise dg.Failure(description=str(exc)) from None


def _parent_run(mlflow: MlflowResource, experiment: str) -> str | None:
    return mlflow.tracking().find_run({"kaapana.federated_experiment": experiment, "kaapana.role": "experiment"})


@dg.asset(partitions_def=experiments_partitions, group_name=HUB_GROUP, kinds={"nnunet", "mlflow"},
          description="The experiment's one plan: every site's fingerprint (aggregates only) combined into a "
                      "global fingerprint, labels and channels checked, nnU-Net planned at the hub, and one "
                      "seeded initial network published to every site.")
def federated_plan(context: dg.AssetExecutionContext, federation: FederationResource, mlflow: MlflowResource,
                   nnunet_settings: NnunetResource) -> dg.MaterializeResult:
    import mlflow as mlflow_api

    from kaapana_assets.federated.hub import plan_experiment, publish_experiment, weights_digest

    experiment = context.partition_key
    spec = _spec(experiment, federation)
    store = federation.store()
    publish_experiment(store, spec)
    sites = [site.name for site in federation.sites()]
    result = _flower_step(federation, PLAN_STEP, experiment, 0, context)
    if not result["ok"]:
        raise dg.Failure(description=f"the plan's Flower run failed: {result['error']}")
    fingerprints = [SiteFingerprint.from_json(v) for _, v in sorted(result["fingerprints"].items())]
    failed = {r["site"]: f"{r['reason']}: {r['message']}" for r in result["rejected"]}
    failed |= {s: "did not answer" for s in sites if s not in result["fingerprints"] and s not in failed}
    for site, message in failed.items():
        context.log.warning(f"{site} is not part of {experiment}: {message}")
    if len(fingerprints) < federation.min_sites:
        raise dg.Failure(description=f"{len(fingerprints)} of {len(sites)} sites sent a fingerprint, "
                         f"{federation.min_sites} needed; nothing planned", metadata={"failed_sites": failed})
    work = nnunet_settings.work_root() / "federated-hub" / experiment
    plan = plan_experiment(store, spec, fingerprints, work)
    participants = sorted(plan.cases)
    store.write_json(experiment, "participants", {"sites": participants, "cases": plan.cases})

    tracking = mlflow.tracking()
    with tracking.run(f"federated {experiment}", tags={"kaapana.federated_experiment": experiment,
                                                     "kaapana.role": "experiment", "kaapana.cohort": spec.cohort,
                                                     "dagster.run_id": context.run.run_id}) as run:
        mlflow_api.log_params({"cohort": spec.cohort, "sites": ",".join(participants), "rounds": spec.rounds,
                               "min_sites": spec.min_sites, **spec.aggregation, "plan_sha256": plan.digest,
                               "transport": "flower", "superlink": federation.superlink,
                               **{f"dp.{k}": v for k, v in spec.privacy.items()},
                               "cases": sum(plan.cases.values()), "patch_size": plan.patch_size,
                               "features_per_stage": plan.features,
                               **{f"schedule.{k}": v for k, v in spec.schedule.items()}})
        mlflow_api.log_dict(plan.plans, "plan/plans.json")
        mlflow_api.log_dict(plan.fingerprint, "plan/dataset_fingerprint.json")
    initial = weights_digest(store.read_global(experiment, 0))
    return dg.MaterializeResult(
        metadata={
            "sites": dg.MetadataValue.table(
                [dg.TableRecord({"site": s, "cases": plan.cases[s]}) for s in participants],
                schema=dg.TableSchema([dg.TableColumn("site", "string"), dg.TableColumn("cases", "int")])),
            "excluded_sites": dg.MetadataValue.json(failed),
            "cases": sum(plan.cases.values()),
            "patch_size": dg.MetadataValue.json(plan.patch_size),
            "features_per_stage": dg.MetadataValue.json(plan.features),
            "median_spacing": dg.MetadataValue.json(
                plan.plans["configurations"][nnunet.CONFIGURATION]["spacing"]),
            "plan_sha256": plan.digest,
            "initial_weights_sha256": initial,
            "mlflow_run_id": run.info.run_id,
            "federation_folder": dg.MetadataValue.path(str(store.experiment_dir(experiment))),
            "differential_privacy": dg.MetadataValue.json(spec.privacy or {"enabled": False}),
        },
        data_version=dg.DataVersion(f"{plan.digest[:12]}-{initial[:12]}"),
    )


def _round_table(rows: list[dict]) -> dg.TableMetadataValue:
    return table(rows, ROUND_SCHEMA)


@dg.asset(partitions_def=rounds_partitions, group_name=HUB_GROUP, kinds={"pytorch", "delta", "mlflow"},
          ins={"federated_plan": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping("experiment"),
                                            dagster_type=dg.Nothing)},
          description="One round, one Flower run: global weights of round r-1 to every site over the "
                      "SuperLink, their signed updates verified (tampered, foreign and replayed ones rejected), "
                      "quorum, aggregation with a Flower strategy, global model r scored by every site on its own "
                      "validation patients. Writes federated_rounds rows and a nested MLflow run.")
def federated_rounds(context: dg.AssetExecutionContext, federation: FederationResource, mlflow: MlflowResource,
                     lake: LakeResource) -> dg.MaterializeResult:
    import mlflow as mlflow_api

    from kaapana_assets.federated.hub import ExperimentSpec
    from kaapana_assets.federation.channel import metric_name

    experiment, round_ = _round(context)
    store = federation.store()
    spec = ExperimentSpec(**store.read_json(experiment, "experiment"))
    if round_ > spec.rounds:
        raise dg.Failure(description=f"{experiment} has {spec.rounds} rounds; {round_} is beyond it")
    _check_budget(store, spec, round_)
    result = _flower_step(federation, ROUND_STEP, experiment, round_, context)
    table = lake.lake()
    rows = _rows(result.get("rows", []))
    if not result["ok"]:
        if rows:
            table.merge(FEDERATED_ROUNDS, _arrow(rows))
        raise dg.Failure(description=str(result["error"]), metadata={"sites": _round_table(rows)} if rows else {})
    written = table.merge(FEDERATED_ROUNDS, _arrow(rows))
    outcome = RoundResult(round_, str(result["global_sha256"]), list(result["aggregated"]),
                          {r["site"]: r["reason"] for r in result["rejected"]}, result["evaluations"],
                          result["metrics"], rows,
                          {r["site"]: r["epsilon"] for r in rows if r["site"] != "global" and r["epsilon"] is not None})
    tracking = mlflow.tracking()
    parent = _parent_run(mlflow, experiment)
    main = metric_name(spec.labels[0])
    with tracking.run(f"{experiment} round {round_}", parent_run_id=parent,
                      tags={"kaapana.federated_experiment": experiment, "kaapana.role": "round",
                            "kaapana.round": str(round_), "dagster.run_id": context.run.run_id}):
        mlflow_api.log_params({"round": round_, "aggregated": ",".join(outcome.aggregated),
                               "rejected": ",".join(f"{s}:{r}" for s, r in outcome.rejected.items()) or "none",
                               **{f"dp.{k}": v for k, v in spec.privacy.items()},
                               "global_sha256": outcome.global_sha256})
        mlflow_api.log_metrics({f"global_{k}": v for k, v in outcome.metrics.items()}, step=round_)
        if outcome.epsilon:
            mlflow_api.log_metrics({"epsilon_max": max(outcome.epsilon.values()),
                                    **{f"{site.replace('-', '_')}.epsilon": e for site, e in outcome.epsilon.items()}},
                                   step=round_)
        for site, metrics in outcome.evaluations.items():
            mlflow_api.log_metrics({f"{site.replace('-', '_')}.{k}": v for k, v in metrics.items()}, step=round_)
    if parent and main in outcome.metrics:
        tracking.client().log_metric(parent, f"global_{main}", outcome.metrics[main], step=round_)
    return dg.MaterializeResult(
        metadata={
            "round": round_,
            "aggregated_sites": dg.MetadataValue.json(outcome.aggregated),
            "rejected_sites": dg.MetadataValue.json(outcome.rejected),
            "aggregation": dg.MetadataValue.json(spec.aggregation),
            "differential_privacy": dg.MetadataValue.json(spec.privacy or {"enabled": False}),
            **({"epsilon": dg.MetadataValue.json(outcome.epsilon),
                "epsilon_max": dg.MetadataValue.float(max(outcome.epsilon.values()))} if outcome.epsilon else {}),
            f"global_{main}": dg.MetadataValue.float(float(outcome.metrics.get(main, float("nan")))),
            "sites": _round_table(outcome.rows),
            "global_sha256": outcome.global_sha256,
            "delta_version": dg.MetadataValue.int(written.version or 0),
        },
        data_version=dg.DataVersion(outcome.global_sha256[:16]),
    )


@dataclass
class RoundResult:
    round: int
    global_sha256: str
    aggregated: list[str]
    rejected: dict[str, str]  # site → reason
    evaluations: dict[str, dict[str, float]]
    metrics: dict[str, float]
    rows: list[dict]
    epsilon: dict[str, float]  # site → ε spent so far; empty without differential privacy


def _check_budget(store: FederationStore, spec: "ExperimentSpec", round_: int) -> None:
    """Refuse round r before its Flower run starts when a participating site would spend more
    than the experiment's budget: no run, no message to a site, no row, no model, no MLflow run.
    Here, not in a blocking asset check: a check runs after the round has trained and sent."""
    privacy = spec.dp
    if not privacy.enabled or privacy.max_epsilon is None:
        return
    from kaapana_assets.federated import accounting

    participants = store.read_json(spec.experiment, "participants")["sites"]
    budget = accounting.budget_of(privacy)
    assert budget is not None
    try:
        accounting.check_round(accounting.read_releases(store, spec.experiment), spec.experiment, round_,
                               participants, accounting.round_mechanism(privacy), budget)
    except accounting.BudgetExceeded as exc:
        raise dg.Failure(description=str(exc), metadata={
            "epsilon_so_far": dg.MetadataValue.json({s: before for s, (before, _) in exc.over.items()}),
            "epsilon_after": dg.MetadataValue.json({s: after for s, (_, after) in exc.over.items()}),
            "max_epsilon": dg.MetadataValue.float(budget.max_epsilon)}) from None


def _rows(rows: list[dict]) -> list[dict]:
    """The ServerApp's rows (JSON) as table rows."""
    return [{**row, "committed_at": dt.datetime.fromisoformat(row["committed_at"])} for row in rows]


def _arrow(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FEDERATED_ROUNDS.schema)


class FederatedModelConfig(dg.Config):
    promote: bool = True  # move `production` to it when its cross-site Dice passes the threshold


@dg.asset(partitions_def=experiments_partitions, group_name=HUB_GROUP, kinds={"mlflow"},
          ins={"federated_rounds": dg.AssetIn(
              partition_mapping=dg.MultiToSingleDimensionPartitionMapping("experiment"), dagster_type=dg.Nothing)},
          description="The experiment's final global model registered in MLflow with its lineage (rounds, sites, "
                      "case counts, plan); promoted to `production` when its cross-site Dice passes.")
def federated_model(context: dg.AssetExecutionContext, config: FederatedModelConfig, federation: FederationResource,
                    mlflow: MlflowResource, nnunet_settings: NnunetResource, lake: LakeResource) -> dg.MaterializeResult:
    import mlflow as mlflow_api

    from kaapana_assets.federated.hub import ExperimentSpec, weights_digest

    experiment = context.partition_key
    store = federation.store()
    spec = ExperimentSpec(**store.read_json(experiment, "experiment"))
    rows = lake.lake().read(FEDERATED_ROUNDS, (pl.col("experiment") == experiment)) \
        if lake.lake().exists(FEDERATED_ROUNDS) else pl.DataFrame()
    done = rows.filter(pl.col("status") == "global").sort("round") if len(rows) else rows
    if not len(done):
        raise dg.Failure(description=f"no round of {experiment} has completed: materialize federated_rounds first")
    last = done.row(-1, named=True)
    round_ = int(last["round"])
    if round_ < spec.rounds:
        context.log.warning(f"{experiment}: registering round {round_} of {spec.rounds}")
    participants = store.read_json(experiment, "participants")
    aggregated = rows.filter((pl.col("status") == "aggregated") & (pl.col("round") == round_))["site"].to_list()
    weights = store.read_global(experiment, round_)
    if weights_digest(weights) != last["global_sha256"]:
        raise dg.Failure(description=f"global model of round {round_} in the hub's federation folder does not match the recorded digest")
    dice = last["dice"]
    threshold = nnunet_settings.promotion_dice
    passed = dice is not None and dice == dice and dice >= threshold
    tracking = mlflow.tracking()
    name = model_name_for(spec.cohort)
    lineage = {
        "kaapana.source": "federated", "kaapana.federated_experiment": experiment, "kaapana.cohort": spec.cohort,
        "kaapana.rounds": str(round_), "kaapana.sites": ",".join(participants["sites"]),
        "kaapana.sites_last_round": ",".join(aggregated),
        "kaapana.cases": json.dumps(participants["cases"], sort_keys=True),
        "kaapana.plan_sha256": str(last["plan_sha256"]), "kaapana.global_sha256": str(last["global_sha256"]),
        "kaapana.strategy": str(spec.strategy), "kaapana.validation": "passed" if passed else "failed",
        "kaapana.validation_dice": f"{dice:.4f}" if dice is not None else "nan",
    }
    with tracking.run(f"{experiment} model", parent_run_id=_parent_run(mlflow, experiment),
                      tags={**lineage, "kaapana.role": "model", "dagster.run_id": context.run.run_id}) as run:
        with tempfile.TemporaryDirectory() as tmp:
            folder = nnunet.model_folder_from_weights(Path(tmp) / "model", store.read_json(experiment, "plans"),
                                                      store.read_json(experiment, "dataset"), weights)
            mlflow_api.log_artifacts(str(folder), "model")
        mlflow_api.log_metrics({"cross_site_dice": float(dice)} if dice is not None else {})
        version = tracking.register(run.info.run_id, "model", name, tags=lineage,
                                    description=f"federated {experiment}: {round_} rounds over "
                                    f"{len(participants['sites'])} sites")
    promoted = bool(config.promote and passed)
    if promoted:
        tracking.promote(name, version.version)
    elif config.promote:
        context.log.warning(f"{name} v{version.version}: cross-site Dice {dice} < {threshold}; not promoted")
    curve = done.select("round", "dice").to_dicts()
    return dg.MaterializeResult(
        metadata={
            "model_name": name, "model_version": dg.MetadataValue.int(int(version.version)),
            "promoted": promoted, "rounds": round_, "cross_site_dice": dg.MetadataValue.float(float(dice or 0.0)),
            "dice_by_round": table((c for c in curve if c["dice"] is not None), DICE_BY_ROUND_SCHEMA),
            "lineage": dg.MetadataValue.json(lineage),
            "mlflow_run_id": run.info.run_id,
        },
        data_version=dg.DataVersion(f"{name}:{version.version}"),
    )


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _completed_round(lake: LakeResource, experiment: str) -> int:
    """The experiment's last completed round: the model federated_model registers."""
    # An absent table reads as empty.
    rows = lake.lake().read(FEDERATED_ROUNDS, (pl.col("experiment") == experiment) & (pl.col("status") == "global"))
    if not len(rows):
        raise dg.Failure(description=f"no round of {experiment} has completed: materialize federated_rounds first")
    return int(rows["round"].max())  # type: ignore[arg-type]


class FederatedEvaluationConfig(dg.Config):
    cohort: str = "liver-test"  # the held-out cohort every site evaluates on (its own version of it)
    round: int | None = None  # the global model of this round; None: the experiment's federated model (its last round)
    min_cell_size: int = 5  # small cells: fewer cases than this leave no site (a site may raise it)


@dg.asset(partitions_def=experiments_partitions, group_name=HUB_GROUP, kinds={"delta", "nnunet"},
          deps=[federated_model],
          description="The federated model evaluated at every site on the site's own held-out cohort (#33's rules: "
                      "a site refuses a cohort that shares a patient with what it trained on) with "
                      "segmentation_evaluation's metrics (Dice, HD95, ASSD, volumes), over one Flower run; only "
                      "per-label aggregates leave a site, suppressed below the small-cell threshold. Writes "
                      "federated_evaluations rows and one box plot per site.")
def federated_evaluation(context: dg.AssetExecutionContext, config: FederatedEvaluationConfig,
                         federation: FederationResource, lake: LakeResource) -> dg.MaterializeResult:
    from kaapana_assets.federated import evaluation_hub
    from kaapana_assets.federated.site_evaluation import GLOBAL
    from kaapana_assets.ingest.study import png_markdown

    experiment = context.partition_key
    round_ = config.round if config.round is not None else _completed_round(lake, experiment)
    store = federation.store()
    if not store.has_global(experiment, round_):
        raise dg.Failure(description=f"{experiment} has no global model of round {round_}")
    request = evaluation_hub.EvaluationRequest(evaluation_hub.new_request_id(), config.cohort, round_, (GLOBAL,),
                                               config.min_cell_size)
    evaluations, refused_models = _evaluate(federation, experiment, request, context)
    refused = {key.split("@", 1)[1]: why for key, why in refused_models.items()}
    if not evaluations:
        raise dg.Failure(description=f"no site evaluated {experiment} round {round_}",
                         metadata={"refused_sites": dg.MetadataValue.json(refused)})
    rows = evaluation_hub.evaluation_rows(experiment, round_, evaluations)
    written = lake.lake().merge(FEDERATED_EVALUATIONS, pa.Table.from_pylist(rows, schema=FEDERATED_EVALUATIONS.schema))
    name = evaluation_hub.model_name(experiment, round_)
    plots = {f"boxplot_{e.site}": dg.MetadataValue.md(png_markdown(evaluation_hub.box_plot_png(e), f"{name} at {e.site}"))
             for e in evaluations}
    return dg.MaterializeResult(
        metadata={
            "model": name, "round": round_, "cohort": config.cohort, "min_cell_size": request.threshold,
            "sites": dg.MetadataValue.json(sorted(e.site for e in evaluations)),
            "refused_sites": dg.MetadataValue.json(refused),
            "held_out": dg.MetadataValue.json({e.site: e.held_out for e in evaluations}),
            "summaries": table(rows, EVALUATION_SCHEMA),
            **plots,
            "delta_version": dg.MetadataValue.int(written.version or 0),
        },
        # The summaries as written: the same answers again are the same data.
        data_version=dg.DataVersion(_digest(sorted(row["row_digest"] for row in rows))),
    )


def _evaluate(federation: FederationResource, experiment: str, request: "EvaluationRequest",
              context: dg.AssetExecutionContext) -> tuple[list["ModelEvaluation"], dict[str, str]]:
    """One `evaluation` Flower run: every model of the request at every site. Returns the
    answers (checked once more here) and, per model and site, why one is missing."""
    from kaapana_assets.federated import evaluation_hub
    from kaapana_assets.federated.site_evaluation import parse_evaluation

    store = federation.store()
    evaluation_hub.write_request(store, experiment, request)
    try:
        result = _flower_step(federation, EVALUATION_STEP, experiment, request.request, context)
    finally:
        evaluation_hub.remove_request(store, experiment, request.request)
    if not result["ok"]:
        raise dg.Failure(description=f"the evaluation's Flower run failed: {result['error']}")
    evaluations = [parse_evaluation(json.dumps(answer), site, model, request.threshold)
                   for model in request.models for site, answer in sorted(result["evaluations"].get(model, {}).items())]
    refused = {f"{r['model']}@{r['site']}": f"{r['reason']}: {r['message']}" for r in result["rejected"]}
    for key, why in refused.items():
        context.log.warning(f"{key.replace('@', ' model at ')}: not evaluated: {why}")
    return evaluations, refused


class CrossSiteEvaluationConfig(dg.Config):
    cohort: str = "liver-test"  # the held-out cohort every site evaluates on (its own version of it)
    min_cell_size: int = 5  # small cells: fewer cases than this leave no site (a site may raise it)
    round: int | None = None  # the global model of this round; None: the experiment's federated model (its last round)
    retrain: bool = False  # train the consenting sites' baselines again (else: those the hub keeps are reused)


@dg.asset(partitions_def=experiments_partitions, group_name=HUB_GROUP, kinds={"delta", "nnunet", "mlflow"},
          deps=[federated_model],
          description="NVIDIA FLARE's cross-site model evaluation for the federation: every consenting site (node "
                      "config share-local-model) trains a local-only baseline with the experiment's plan, initial "
                      "network and schedule; every site evaluates the global model and each consenting site's model "
                      "on its own held-out cohort (aggregates only, suppressed below the small-cell threshold). "
                      "Writes cross_site_evaluations rows, cross_val_results.json (data site × model owner), a heat "
                      "map (also to the federated model's MLflow run), and answers per site: global vs own model.")
def cross_site_evaluation(context: dg.AssetExecutionContext, config: CrossSiteEvaluationConfig,
                          federation: FederationResource, lake: LakeResource,
                          mlflow: MlflowResource) -> dg.MaterializeResult:
    from kaapana_assets.federated import evaluation_hub
    from kaapana_assets.federated.hub import ExperimentSpec
    from kaapana_assets.federated.site_evaluation import GLOBAL
    from kaapana_assets.ingest.study import png_markdown

    experiment = context.partition_key
    store = federation.store()
    spec = ExperimentSpec(**store.read_json(experiment, "experiment"))
    round_ = config.round if config.round is not None else _completed_round(lake, experiment)
    sites = [site.name for site in federation.sites()]
    declined: dict[str, str] = {}
    if config.retrain or not all(store.has_local(experiment, site) for site in sites):
        result = _flower_step(federation, BASELINE_STEP, experiment, evaluation_hub.new_request_id(), context)
        if not result["ok"]:
            raise dg.Failure(description=f"the baselines' Flower run failed: {result['error']}")
        declined = dict(result["declined"]) | {r["site"]: f"{r['reason']}: {r['message']}" for r in result["rejected"]}
        for site, why in declined.items():
            context.log.info(f"{site}: no local baseline: {why}")
    owners = [site for site in sites if store.has_local(experiment, site) and site not in declined]
    request = evaluation_hub.EvaluationRequest(evaluation_hub.new_request_id(), config.cohort, round_,
                                               (GLOBAL, *owners), config.min_cell_size)
    evaluations, refused = _evaluate(federation, experiment, request, context)
    if not evaluations:
        raise dg.Failure(description=f"no site evaluated a model of {experiment}",
                         metadata={"refused": dg.MetadataValue.json(refused)})
    matrix = evaluation_hub.cells(evaluations)
    written = lake.lake().merge(CROSS_SITE_EVALUATIONS, pa.Table.from_pylist(
        evaluation_hub.matrix_rows(experiment, matrix), schema=CROSS_SITE_EVALUATIONS.schema))
    label = spec.labels[0]
    answer = evaluation_hub.answer(matrix, sites, label)
    context.log.info(f"cross-site evaluation of {experiment} (Dice of {label}, each site's own held-out data):\n"
                     + answer.text())
    layout = evaluation_hub.cross_val_results(matrix)
    layout_path = store.write_json(experiment, "cross_val_results", layout)
    heat_map = evaluation_hub.heat_map_png(matrix, label, title=f"{experiment}: cross-site Dice of {label}")
    heat_map_path = store.experiment_dir(experiment) / "cross_site_heat_map.png"
    write_atomically(heat_map_path, heat_map)
    model_run = mlflow.tracking().find_run({"kaapana.federated_experiment": experiment, "kaapana.role": "model"})
    if model_run:  # beside the federated model it judges
        client = mlflow.tracking().client()
        client.log_artifact(model_run, str(layout_path), "cross_site")
        client.log_artifact(model_run, str(heat_map_path), "cross_site")
    dice = [c for c in matrix if c.metric == "dice" and c.label == label]
    return dg.MaterializeResult(
        metadata={
            "round": round_, "cohort": config.cohort, "min_cell_size": request.threshold,
            "model_owners": dg.MetadataValue.json([GLOBAL, *owners]),
            "declined": dg.MetadataValue.json(declined),
            "refused": dg.MetadataValue.json(refused),
            "answer": dg.MetadataValue.md("\n".join(f"- {line}" for line in answer.text().splitlines())),
            "global_worse_at": dg.MetadataValue.json(answer.worse),
            "verdicts": table(({**vars(v), "global_not_worse": v.global_not_worse} for v in answer.verdicts),
                              VERDICT_SCHEMA),
            "matrix": table(({**vars(c), "metric": str(c.metric)} for c in dice), MATRIX_SCHEMA),
            "cross_val_results": dg.MetadataValue.json(layout),
            "cross_val_results_path": dg.MetadataValue.path(str(layout_path)),
            "heat_map": dg.MetadataValue.md(png_markdown(heat_map, f"cross-site Dice of {label}")),
            "mlflow_run_id": model_run or "",
            "delta_version": dg.MetadataValue.int(written.version or 0),
        },
        data_version=dg.DataVersion(_digest(layout)),  # the matrix as NVFlare's layout holds it
    )


federated_round_job = dg.define_asset_job("federated_round", selection=[federated_rounds],
                                          description="One round of a federated experiment.")
federated_model_job = dg.define_asset_job("register_federated_model", selection=[federated_model],
                                          description="Register (and promote) a federated experiment's model.")


hub_assets = [federated_plan, federated_rounds, federated_model, federated_evaluation, cross_site_evaluation]
defs = dg.Definitions(assets=[*hub_assets, *SITE_ASSETS.values()],
                      jobs=[federated_round_job, federated_model_job])

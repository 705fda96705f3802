"""`make demo`: the whole story on the embedded defaults, through Dagster.

1. Three sites' annotated studies: the first site's land in the spool (as the DICOM
   receiver would put them) and are ingested through the incoming_studies sensor; the
   other two ingest at their own homes (their own lakes; their data never comes here).
2. Cohorts are materialized with their blocking checks. One patient per site is reviewed
   for testing: liver-train leaves the reviewed series out, reviewed-test leaves liver-train's
   patients out, so the test patients are held out from training.
3. Federated nnU-Net (short schedule) over Flower: a SuperLink and one SuperNode per site
   start as local processes (TLS, SuperNode authentication); plan from fingerprints,
   rounds with local differential privacy and a declared budget, model registered and
   promoted — through the real assets. ε spent per site is printed after the rounds.
4. The promoted model is evaluated on reviewed-test (segmentation_evaluation), which holds
   it to the held-out rule: no test patient among the patients it trained on.
5. New unannotated studies arrive in the spool; the sensor's runs ingest and segment them
   with the promoted model in one run each (the automation would segment any study ingested
   otherwise); the SEGs land in the archive.
Every run executes in-process on the persistent Dagster instance, so `make dev` shows them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, TypedDict

import dagster as dg
import polars as pl
from rich.console import Console
from rich.table import Table

from kaapana_assets.archive.service import Archive
from kaapana_assets.cohorts.membership import snapshot_cohort
from kaapana_assets.demo_driver import RunOutcome, log_level_config, run_requests, tick
from kaapana_assets.environment import Environment
from kaapana_assets.federated.hub import Privacy
from kaapana_assets.federation.keys import generate_site_key
from kaapana_assets.federation.local import LocalFederation, LocalSite
from kaapana_assets.federation.sites import SiteEntry, read_sites, write_sites
from kaapana_assets.home import KaapanaHome
from kaapana_assets.ingest.pipeline import ingest_files
from kaapana_assets.lake import Lake
from kaapana_assets.lake.schemas import COHORT_MEMBERS, FEDERATED_ROUNDS, QUARANTINE, SEGMENTATIONS, SERIES, STUDIES
from kaapana_assets.synthetic import generate_site, get_profile
from resources.federation import FederationResource
from resources.nnunet import NnunetResource
from resources.storage import ArchiveResource


def _truncated_copy(source: Path, target: Path) -> None:
    """A file cut off in transfer: what a flaky network delivers now and then."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


class Grid(TypedDict):
    """The synthetic CT's grid (generate_site's keywords); None keeps the scanner's."""

    slices: int | None
    matrix: int | None


# The scanners' slices (their slice thickness is what cohorts filter on), a smaller in-plane
# matrix: the whole story takes minutes on a laptop CPU.
DEMO_GRID: Grid = {"slices": None, "matrix": 48}
EXPERIMENT = "liver-fed"
# Local DP of the demo's experiment: every site clips its update to L2 norm 40 (above the mean
# update of the demo's schedules, ~17 tiny and ~36 short, so clipping barely slows learning)
# and adds Gaussian noise of 5e-5 × 40 = 0.002 per weight, small beside the weights (RMS ~0.05)
# and, over ~2–9 million weights, about a tenth of the update's norm. The price is ε: noise
# that a network of millions of weights learns through, from three sites, buys a very large ε
# (about 6.6e8 after three rounds at δ 1e-5); the demo shows the counting and the budget, not a
# meaningful guarantee (docs/federation.md, the privacy budget). The budget lets four rounds run.
DEMO_PRIVACY = Privacy.calibrated(clipping_norm=40.0, noise_multiplier=5e-5, delta=1e-5, max_epsilon=1e9)


def _dagster_home(home: KaapanaHome) -> Path:
    import definitions

    os.environ.setdefault("DAGSTER_HOME", str(home.root / "dagster"))
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        shutil.copy(Path(definitions.__file__).parent / "dagster.yaml", dagster_home / "dagster.yaml")
    return dagster_home


def _print_outcome(console: Console, outcome: RunOutcome, name: str | None = None) -> None:
    console.print(f"  {'[green]✓' if outcome.success else '[red]✗'}[/] {name or outcome.job_name} {outcome.label}")


def _spool_and_ingest(console: Console, defs: dg.Definitions, instance: dg.DagsterInstance,
                      resources: dict[str, Any], cursor: str | None = None) -> tuple[int, str | None]:
    """One tick of the incoming_studies sensor, then every run it requested, in-process."""
    # The files were just copied: no need to wait the receiver's quiet period.
    archive = ArchiveResource(home=resources["archive"].home, quiet_period_s=0.0)
    ticked = tick(defs, instance, "incoming_studies", resources={**resources, "archive": archive}, cursor=cursor)
    console.print(f"sensor incoming_studies: {len(ticked.run_requests)} run request(s)")
    failed = 0
    for outcome in run_requests(defs, instance, ticked.run_requests, status=console.status):
        failed += not outcome.success
        _print_outcome(console, outcome)
    return failed, ticked.cursor


def run_demo(console: Console, sites: list[str], studies: int, seed: int, rounds: int = 3,
             new_studies: int = 2, grid: Grid | None = None, schedule: str = "short",
             promotion_dice: float = 0.7, local_epochs: int = 2) -> int:
    import definitions  # the real code location

    environment = Environment.read()  # the demo's top: the environment, read once
    home = KaapanaHome(environment.home).ensure()
    _dagster_home(home)
    # A newcomer reads the story, not library notices (they are in the Dagster run logs).
    warnings.filterwarnings("ignore", module=r"dagster(\.|$)")
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console.rule("[bold]kaapana_assets demo")
    console.print(f"KAAPANA_HOME = {home.root}  (the hub, and {sites[0]}'s own platform)\n"
                  f"DAGSTER_HOME = {os.environ['DAGSTER_HOME']}")
    # The code location with resources for the environment read above: the definitions'
    # load-time resources are those of whatever environment imported them first.
    defs = definitions.definitions_for(environment)
    instance = dg.DagsterInstance.get()
    resources: dict[str, Any] = dict(defs.resources or {})
    failed = 0
    grid = grid or DEMO_GRID

    console.rule(f"1 · annotated studies of {len(sites)} sites")
    site_homes = {sites[0]: home, **{s: KaapanaHome(home.root / "sites" / s).ensure() for s in sites[1:]}}
    lakes = _site_lakes(environment, site_homes)
    lake = lakes[sites[0]]
    if not lake.is_local:
        console.print(f"the lakes on the object store: {lake.root} (the hub and {sites[0]}), "
                      f"{lake.root}/sites/<site> (the other sites)")
    with tempfile.TemporaryDirectory() as tmp:
        for site in sites:
            with console.status(f"synthesizing {studies} annotated studies of {site}"):
                generated = generate_site(site, studies, seed, Path(tmp), with_annotations=True, **grid)
            if site == sites[0]:
                target = home.incoming / site
                shutil.copytree(Path(tmp) / site, target, dirs_exist_ok=True)
                _truncated_copy(generated[0].ct_files[0], target / "truncated-in-transfer.dcm")
                console.print(f"{site}: {sum(len(g.files) for g in generated)} files + 1 truncated file → spool")
            else:
                # The other sites ingest on their own platforms; their data never comes here.
                with console.status(f"{site} ingests at its own site"):
                    ingest_files([f for g in generated for f in g.files],
                                 Archive.for_home(site_homes[site], lakes[site]), remove_sources=False)
                console.print(f"{site}: {sum(len(g.files) for g in generated)} files ingested at "
                              f"{site_homes[site].root} (its own lake and archive)")
    ingest_failed, cursor = _spool_and_ingest(console, defs, instance, resources)
    failed += ingest_failed
    _print_summary(console, lake, sites[:1])

    console.rule("2 · cohorts and their harmonization checks")
    _curate(console, lake)
    failed += _cohorts(console, defs, instance, resources)
    train_cohort = resources["cohort_definitions"].get("liver-train")
    for site in sites[1:]:
        snapshot = snapshot_cohort(lakes[site], train_cohort)
        console.print(f"{site}: cohort liver-train v{snapshot.version} ({snapshot.size} series) at its own site")

    console.rule(f"3 · federated nnU-Net across {len(sites)} sites, {rounds} rounds")
    federation_file, local_sites = _federation_file(home, site_homes, lakes)
    with console.status("starting a Flower SuperLink and one SuperNode per site"):
        network = LocalFederation(home.root / "flower", local_sites).start()
    try:
        console.print(f"SuperLink on {network.connection.address} (TLS, SuperNode authentication); "
                      f"{len(local_sites)} SuperNodes dialled out to it; logs in {network.folder / 'logs'}")
        federation = FederationResource(
            superlink=network.connection.address, root_certificate=str(network.connection.root_certificate),
            federation_file=str(federation_file), folder=str(home.hub_federation),
            rounds=rounds, min_sites=2, schedule=schedule, local_epochs=local_epochs, timeout_s=1800.0,
            dp_clipping_norm=DEMO_PRIVACY.clipping_norm, dp_sensitivity=DEMO_PRIVACY.sensitivity,
            dp_epsilon=DEMO_PRIVACY.epsilon, dp_delta=DEMO_PRIVACY.delta, dp_max_epsilon=DEMO_PRIVACY.max_epsilon)
        console.print(f"schedule {schedule}, {federation.local_epochs} local epoch(s) per round; the model is "
                      f"promoted when its cross-site liver Dice reaches {promotion_dice}")
        console.print(f"local differential privacy: each site clips its update to {DEMO_PRIVACY.clipping_norm:g} "
                      f"and adds noise σ {DEMO_PRIVACY.noise_stdv:.3g} per weight (noise multiplier "
                      f"{DEMO_PRIVACY.noise_stdv / DEMO_PRIVACY.clipping_norm:.3g}); budget ε ≤ "
                      f"{DEMO_PRIVACY.max_epsilon:g} per site at δ {DEMO_PRIVACY.delta:g}")
        federated = _federate(console, instance, {**resources, "nnunet_settings": NnunetResource(
            workdir=str(home.root / "nnunet"), promotion_dice=promotion_dice)}, federation)
        failed += federated
    finally:
        network.close()  # the demo's own processes, by process group

    console.rule("4 · the promoted model on the held-out test cohort")
    if federated:
        console.print("  [yellow]no model was promoted: nothing to evaluate")
    else:
        failed += _evaluate(console, lake, instance, resources)

    console.rule("5 · new, unannotated studies arrive and are segmented automatically")
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    with tempfile.TemporaryDirectory() as tmp:
        generate_site(sites[0], new_studies, seed + 1, Path(tmp), first_index=500, **grid)
        shutil.copytree(Path(tmp) / sites[0], home.incoming / f"{sites[0]}-new", dirs_exist_ok=True)
    console.print(f"{new_studies} new CT studies (no annotations) → spool")
    # A production model exists now: the sensor's runs are ingest_and_segment (both in one run).
    ingest_failed, cursor = _spool_and_ingest(console, defs, instance, resources, cursor)
    failed += ingest_failed
    evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    requested = sorted(k for k in evaluation.get_requested_partitions(dg.AssetKey("segmentations")) if k)
    console.print(f"automation (segmentation_automation sensor, for studies ingested without their "
                  f"segmentation): {len(requested)} study(ies) left to segment")
    # What the automation sensor would launch: the segment_studies job, one run per study.
    segment = [dg.RunRequest(job_name="segment_studies", partition_key=study_uid) for study_uid in requested]
    for outcome in run_requests(defs, instance, segment, status=console.status):
        failed += not outcome.success
        _print_outcome(console, outcome, "segmentations")

    console.rule("summary")
    _final_summary(console, lake)
    console.print(
        "\n[bold]Where to look next[/]\n"
        "  make dev                                   Dagster UI on http://localhost:3000 with these runs\n"
        f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{home.root / 'mlflow.db'}   MLflow on :5000\n"
        f"  kaapana federation rounds {EXPERIMENT}          every site's part in every round, with ε so far\n"
        f"  kaapana lineage {_a_seg_uid(lake)}\n"
        "      the chain of that SEG: model → rounds → cohorts → Delta versions → source UIDs\n"
        f"  Delta tables under {lake.root}"
    )
    return 1 if failed else 0


def _site_lakes(environment: Environment, site_homes: dict[str, KaapanaHome]) -> dict[str, Lake]:
    """Each site's lake: in its home's folder; on the object store when KAAPANA_LAKE_URI names
    one (the first site's at that URI, the others' under <URI>/sites/<site>)."""
    first, *others = site_homes
    hub = Lake.of(environment)
    if hub.is_local:
        return {site: Lake(home.lake) for site, home in site_homes.items()}
    return {first: hub, **{site: Lake(f"{hub.root}/sites/{site}", environment.lake_storage_options,
                                      environment.lake_unsafe_store) for site in others}}


def _a_seg_uid(lake: Lake) -> str:
    if not lake.exists(SEGMENTATIONS):
        return "<SEG SOPInstanceUID>"
    return str(lake.read(SEGMENTATIONS)["seg_sop_instance_uid"][0])


def _federation_file(home: KaapanaHome, site_homes: dict[str, KaapanaHome],
                     lakes: dict[str, Lake]) -> tuple[Path, list[LocalSite]]:
    """federation.yaml (so `make dev` shows the same federation) and the sites' local
    processes, each told its own lake when they lie on the object store; a rerun keeps each
    site's signing key."""
    path = home.root / "federation.yaml"
    known = {s.name: s.key for s in read_sites(path)} if path.exists() else {}
    # The sites train at once on this machine: torch threads that share its cores, at most two
    # each (more threads than cores makes each site's training slower, not faster).
    threads = min(2, max(1, (os.cpu_count() or 1) // len(site_homes)))
    sites = [LocalSite(name, site_home.root, known.get(name) or generate_site_key(), "auto", threads,
                       environment={} if lakes[name].is_local else {"KAAPANA_LAKE_URI": lakes[name].root})
             for name, site_home in site_homes.items()]
    # Demo only: keys inline. In production each key lives in a secret (key_env or key_file).
    write_sites(path, [SiteEntry(s.name, key=s.key) for s in sites])
    os.environ.setdefault("KAAPANA_FEDERATION", str(path))
    return path, sites


def _federate(console: Console, instance: dg.DagsterInstance, resources: dict[str, Any],
              federation: FederationResource) -> int:
    from kaapana_assets.federated.assets import federated_model, federated_plan, federated_rounds
    from kaapana_assets.federated.partitions import round_key

    resources = {**resources, "federation": federation}
    quiet = log_level_config("ERROR")
    if not instance.has_dynamic_partition("federated_experiments", EXPERIMENT):
        instance.add_dynamic_partitions("federated_experiments", [EXPERIMENT])

    log_path = Path(os.environ["DAGSTER_HOME"]).parent / "logs" / "federated.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"nnU-Net's own output goes to {log_path}")

    def run(assets: list[dg.AssetsDefinition], partition: str, label: str) -> dg.ExecuteInProcessResult | None:
        # nnU-Net prints every epoch to stdout: keep it in a log file, the console shows progress.
        # The spinner gets its own console, pinned to today's stdout, or it would follow stdout
        # into the log file.
        spinner = Console(file=console.file)
        with spinner.status(label), log_path.open("a") as log, redirect_stdout(log), redirect_stderr(log):
            result = dg.materialize(assets, partition_key=partition, instance=instance, resources=resources,
                                    selection=[assets[-1]], raise_on_error=False, run_config=quiet)
        if not result.success:
            failures = result.get_step_failure_events()
            error = failures[0].step_failure_data.error if failures else None
            console.print(f"  [red]✗[/] {label}: {error.message if error else ''}")
            return None
        return result

    plan = run([federated_plan], EXPERIMENT, "federated_plan: fingerprints from every site, one plan at the hub")
    if plan is None:
        return 1
    md = plan.get_asset_materialization_events()[0].materialization.metadata
    console.print(f"  [green]✓[/] federated_plan[{EXPERIMENT}]: {md['cases'].value} cases, patch "
                  f"{md['patch_size'].value}, network {md['features_per_stage'].value}")
    for r in range(1, federation.rounds + 1):
        result = run([federated_plan, federated_rounds], round_key(EXPERIMENT, r),
                     f"round {r}/{federation.rounds}: every site trains from the global model")
        if result is None:
            return 1
        md = result.get_asset_materialization_events()[0].materialization.metadata
        aggregated = md["aggregated_sites"].value
        sites = ", ".join(map(str, aggregated)) if isinstance(aggregated, list) else str(aggregated)
        console.print(f"  [green]✓[/] round {r}: {sites} aggregated; "
                      f"global liver Dice on the sites' own validation patients "
                      f"{md['global_dice_liver'].value:.3f}")
        if "epsilon" in md:
            spent = md["epsilon"].value
            assert isinstance(spent, dict)
            console.print("    ε so far: " + ", ".join(f"{site} {e:.4g}" for site, e in sorted(spent.items())))
    model = run([federated_rounds, federated_model], EXPERIMENT, "federated_model: register and promote")
    if model is None:
        return 1
    md = model.get_asset_materialization_events()[0].materialization.metadata
    console.print(f"  [green]✓[/] {md['model_name'].value} v{md['model_version'].value} registered"
                  + (" and promoted to production" if md["promoted"].value else " (not promoted: below threshold)"))
    return 0 if md["promoted"].value else 1


def _final_summary(console: Console, lake: Lake) -> None:
    rounds = lake.read(FEDERATED_ROUNDS, (pl.col("experiment") == EXPERIMENT) & (pl.col("site") == "global"))
    table = Table(title=f"Federated experiment {EXPERIMENT}")
    for column in ("round", "cases", "global liver Dice"):
        table.add_column(column, justify="right")
    for row in rounds.sort("round").iter_rows(named=True):
        table.add_row(str(row["round"]), str(row["cases"]), f"{row['dice']:.3f}" if row["dice"] is not None else "—")
    console.print(table)
    _privacy_summary(console, lake)
    if lake.exists(SEGMENTATIONS):
        segs = lake.read(SEGMENTATIONS, pl.col("label") == "liver").sort("study_uid")
        table = Table(title="Automatic segmentations (DICOM SEG in the archive)")
        for column in ("study", "SEG SOPInstanceUID", "model", "liver volume (ml)", "mean HU"):
            table.add_column(column)
        for row in segs.iter_rows(named=True):
            table.add_row(row["study_uid"][-16:], row["seg_sop_instance_uid"],
                          f"{row['model_name']} v{row['model_version']}", f"{row['volume_ml']:.0f}",
                          f"{row['mean_hu']:.0f}")
        console.print(table)


def _privacy_summary(console: Console, lake: Lake) -> None:
    """ε per site after the experiment's rounds: the site's ε after the last round it sent in
    (the `epsilon` column of federated_rounds, as `kaapana federation rounds` shows it)."""
    rows = lake.read(FEDERATED_ROUNDS, (pl.col("experiment") == EXPERIMENT) & (pl.col("site") != "global")
                     & pl.col("epsilon").is_not_null())
    if not rows.height:
        return
    last = rows.sort("round").group_by("site").agg(pl.col("round").last(), pl.col("epsilon").last()).sort("site")
    console.print(f"privacy spent (RDP accountant, δ {DEMO_PRIVACY.delta:g}, budget {DEMO_PRIVACY.max_epsilon:g}): "
                  + ", ".join(f"{row['site']} ε {row['epsilon']:.4g} after round {row['round']}"
                              for row in last.iter_rows(named=True)))
    console.print("  noise small enough for the network to learn through is a very large ε: the demo shows "
                  "the counting and the budget, not a strong guarantee")


def _curate(console: Console, lake: Lake) -> None:
    """A radiologist reviews one patient per site for testing and tags their CT series (the
    reviewed-test cohort). Every series of the patient: held out is per patient, and liver-train
    leaves tagged series out."""
    from kaapana_assets.cohorts.tags import add_tag

    series = lake.read(SERIES).filter(pl.col("modality") == "CT").sort("series_uid")
    patients = series.group_by("institution").agg(pl.col("patient_id").first())["patient_id"].to_list()
    chosen = series.filter(pl.col("patient_id").is_in(patients))["series_uid"].to_list()
    add_tag(lake, "reviewed", chosen)
    console.print(f"tagged {len(chosen)} series of {len(patients)} patient(s) 'reviewed' (kaapana tag add reviewed "
                  "--series ...): liver-train leaves them out, reviewed-test holds them")


def _evaluate(console: Console, lake: Lake, instance: dg.DagsterInstance, resources: dict[str, Any]) -> int:
    """segmentation_evaluation[reviewed-test] of the production model, with its gate; the
    asset refuses a cohort version with patients the model trained on. Says what it is
    disjoint from: every training cohort of this site, and the model's training data."""
    from kaapana_assets.cohorts.exclusion import cohort_patients
    from kaapana_assets.cohorts.membership import read_cohort
    from kaapana_assets.evaluation.assets import evaluation_gate, segmentation_evaluation

    cohort = "reviewed-test"
    with console.status(f"segmentation_evaluation[{cohort}]: segment and measure against the reference SEGs"):
        result = dg.materialize([segmentation_evaluation, evaluation_gate], partition_key=cohort, instance=instance,
                                resources=resources, raise_on_error=False, run_config=log_level_config("ERROR"))
    if not result.success:
        failures = result.get_step_failure_events()
        error = failures[0].step_failure_data.error if failures else None
        console.print(f"  [red]✗[/] segmentation_evaluation[{cohort}]: {error.message if error else ''}")
        return 1
    md = result.asset_materializations_for_node("segmentation_evaluation")[0].metadata
    version, dice = md["cohort_version"].value, md["dice_mean"].value
    assert isinstance(version, int) and isinstance(dice, dict)
    tested = read_cohort(lake, cohort, version).patients
    training = sorted({c for c in lake.read(COHORT_MEMBERS, pl.col("purpose") == "train")["cohort"].to_list()})
    shared = {}
    for name in training:
        found = cohort_patients(lake, name)
        if found is not None:
            shared[f"{name} v{found.version}"] = sorted(tested & found.patients)
    console.print(f"  [green]✓[/] {md['model_name'].value} v{md['model_version'].value} on {cohort} "
                  f"v{md['cohort_version'].value}: {md['cases'].value} case(s) of {len(tested)} patient(s), mean Dice "
                  + ", ".join(f"{label} {value:.3f}" for label, value in dice.items() if value is not None))
    console.print(f"  {md['training_data'].value}")
    overlapping = {name: patients for name, patients in shared.items() if patients}
    if overlapping:
        console.print(f"  [red]✗[/] {cohort} shares patients with training cohorts: {overlapping}")
        return 1
    console.print(f"  {cohort} shares no patient with any training cohort of this site ({', '.join(shared) or 'none'})")
    return 0


def _cohorts(console: Console, defs: dg.Definitions, instance: dg.DagsterInstance, resources: dict[str, Any]) -> int:
    """Register the cohort definitions, snapshot each cohort with its checks, then the
    site statistics. A failed harmonization check is a finding, not a demo failure."""
    tick(defs, instance, "cohort_definitions", resources=resources)  # registers the cohorts partitions
    # Every cohort, as a user would launch materialize_cohort for each from the UI.
    cohorts = [dg.RunRequest(job_name="materialize_cohort", partition_key=name)
               for name in sorted(instance.get_dynamic_partitions("cohorts"))]
    quiet = "CRITICAL"  # outcomes are tabled below
    table = Table(title="Cohorts and their harmonization checks")
    for column in ("cohort", "version", "series", "checks", "failed checks"):
        table.add_column(column)
    errors = 0
    for outcome in run_requests(defs, instance, cohorts, log_level=quiet, status=console.status):
        name = outcome.label
        materializations = outcome.result.asset_materializations_for_node("cohorts")
        if not materializations:
            console.print(f"  [yellow]cohort {name} not materialized (no matching series?)")
            continue
        md = materializations[0].metadata
        checks = outcome.result.get_asset_check_evaluations()
        bad = [f"{e.check_name}: {e.description}" for e in checks if not e.passed]
        table.add_row(name, str(md["cohort_version"].value), str(md["series"].value),
                      f"{len(checks) - len(bad)}/{len(checks)} passed", "\n".join(bad) or "—")
    console.print(table)
    console.print("A failed check blocks training on its cohort: mixing scanners with different slice "
                  "thickness is what the pre-learning checks exist to catch.")
    stats = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[dg.AssetKey("site_statistics")], instance=instance, raise_on_error=False,
        run_config=log_level_config(quiet))
    errors += not stats.success
    if stats.success:
        path = stats.asset_materializations_for_node("site_statistics")[0].metadata["openmetrics_file"].value
        console.print(f"site statistics → Delta table site_statistics and {path}")
    return errors


def _print_summary(console: Console, lake: Lake, sites: list[str]) -> None:
    studies = lake.read(STUDIES)
    quarantine = lake.read(QUARANTINE)
    table = Table(title="What the lake holds, per site")
    for column in ("site", "institution", "patients", "studies", "series", "instances", "quarantined"):
        table.add_column(column, justify="left" if column in ("site", "institution") else "right")
    for site in sites:
        institution = get_profile(site).institution
        mine = studies.filter(pl.col("institution") == institution)
        # Quarantined files carry no trustworthy site: attribute them by spool folder.
        quarantined = quarantine.filter(pl.col("source_path").str.contains(f"/{site}/", literal=True)).height
        table.add_row(
            site, institution, str(mine["patient_id"].n_unique()), str(mine.height),
            str(mine["series_count"].sum()), str(mine["instance_count"].sum()), str(quarantined),
        )
    console.print(table)
    reasons = quarantine.group_by("reason").len().sort("reason").iter_rows()
    console.print("quarantine reasons: " + (", ".join(f"{r}: {n}" for r, n in reasons) or "none"))

"""`make demo`: the main flow end to end on the embedded defaults, through Dagster.

Synthetic studies of several sites land in the spool (as the DICOM receiver would put
them), the incoming_studies sensor is evaluated, and each run it requests is executed
in-process on the persistent Dagster instance, so `make dev` shows the runs afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import dagster as dg
import polars as pl
from rich.console import Console
from rich.table import Table

from kaapana_assets.home import KaapanaHome
from kaapana_assets.synthetic import generate_site, get_profile
from resources.storage import ArchiveResource


def _truncated_copy(source: Path, target: Path) -> None:
    """A file cut off in transfer: what a flaky network delivers now and then."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def run_demo(console: Console, sites: list[str], studies: int, seed: int) -> int:
    import definitions  # the real code location

    home = KaapanaHome.from_env().ensure()
    os.environ.setdefault("DAGSTER_HOME", str(home.root / "dagster"))
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        shutil.copy(Path(definitions.__file__).parent / "dagster.yaml", dagster_home / "dagster.yaml")
    console.rule("[bold]kaapana_assets demo")
    console.print(f"KAAPANA_HOME = {home.root}\nDAGSTER_HOME = {os.environ['DAGSTER_HOME']}")

    with tempfile.TemporaryDirectory() as tmp:
        for site in sites:
            with console.status(f"synthesizing {studies} studies of {site}"):
                generated = generate_site(site, studies, seed, Path(tmp), with_annotations=True)
            target = home.incoming / site
            shutil.copytree(Path(tmp) / site, target, dirs_exist_ok=True)
            _truncated_copy(generated[0].ct_files[0], target / "truncated-in-transfer.dcm")
            console.print(f"{site}: {sum(len(g.files) for g in generated)} files + 1 truncated file → spool")

    defs = definitions.defs
    instance = dg.DagsterInstance.get()
    sensor = defs.get_sensor_def("incoming_studies")
    resources = defs.resources or {}
    # The files were just copied: no need to wait the receiver's quiet period.
    archive = ArchiveResource(quiet_period_s=0.0)
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        context = dg.build_sensor_context(
            instance=instance, instance_ref=instance.get_ref(), definitions=defs,
            resources={**resources, "archive": archive},
        )
        result = sensor.evaluate_tick(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys or []))
    console.print(f"sensor: {len(result.run_requests or [])} run request(s)")

    failed = 0
    for request in result.run_requests or []:
        job = defs.resolve_job_def(request.job_name)  # type: ignore[arg-type]
        label = request.partition_key or request.job_name
        with console.status(f"running {request.job_name} {label}"):
            outcome = job.execute_in_process(
                run_config={**request.run_config, "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                partition_key=request.partition_key, instance=instance,
                tags=request.tags, raise_on_error=False,
            )
        failed += not outcome.success
        console.print(f"  {'[green]✓' if outcome.success else '[red]✗'}[/] {request.job_name} {label}")

    _print_summary(console, home, sites)
    _curate(console, home)
    failed += _cohorts(console, defs, instance, resources)
    console.print(
        "\nNext: [bold]make dev[/] opens the Dagster UI on http://localhost:3000 with these runs; "
        f"the Delta tables are under {home.lake}."
    )
    return 1 if failed else 0


def _curate(console: Console, home: KaapanaHome) -> None:
    """A radiologist reviews one CT series per site and tags it (the reviewed-test cohort)."""
    from kaapana_assets.cohorts.tags import add_tag
    from kaapana_assets.lake import Lake

    lake = Lake(home.lake)
    series = lake.read("series").filter(pl.col("modality") == "CT").sort("series_uid")
    chosen = series.group_by("institution").agg(pl.col("series_uid").first())["series_uid"].to_list()
    add_tag(lake, "reviewed", chosen)
    console.print(f"tagged {len(chosen)} series 'reviewed' (kaapana tag add reviewed --series ...)")


def _cohorts(console: Console, defs: dg.Definitions, instance: dg.DagsterInstance, resources: dict) -> int:
    """Register the cohort definitions, snapshot each cohort with its checks, then the
    site statistics. A failed harmonization check is a finding, not a demo failure."""
    sensor = defs.get_sensor_def("cohort_definitions")
    result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=resources, definitions=defs))
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys or []))
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}  # outcomes are tabled below
    job = defs.resolve_job_def("materialize_cohort")
    table = Table(title="Cohorts and their harmonization checks")
    for column in ("cohort", "version", "series", "checks", "failed checks"):
        table.add_column(column)
    errors = 0
    for name in sorted(instance.get_dynamic_partitions("cohorts")):
        with console.status(f"materializing cohort {name}"):
            outcome = job.execute_in_process(partition_key=name, instance=instance, raise_on_error=False, run_config=quiet)
        materializations = outcome.asset_materializations_for_node("cohorts")
        if not materializations:
            console.print(f"  [yellow]cohort {name} not materialized (no matching series?)")
            continue
        md = materializations[0].metadata
        checks = outcome.get_asset_check_evaluations()
        bad = [f"{e.check_name}: {e.description}" for e in checks if not e.passed]
        table.add_row(name, str(md["cohort_version"].value), str(md["series"].value),
                      f"{len(checks) - len(bad)}/{len(checks)} passed", "\n".join(bad) or "—")
    console.print(table)
    console.print("A failed check blocks training on its cohort: mixing scanners with different slice "
                  "thickness is what the pre-learning checks exist to catch.")
    stats = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[dg.AssetKey("site_statistics")], instance=instance, raise_on_error=False, run_config=quiet)
    errors += not stats.success
    if stats.success:
        path = stats.asset_materializations_for_node("site_statistics")[0].metadata["openmetrics_file"].value
        console.print(f"site statistics → Delta table site_statistics and {path}")
    return errors


def _print_summary(console: Console, home: KaapanaHome, sites: list[str]) -> None:
    from kaapana_assets.lake import Lake

    lake = Lake(home.lake)
    studies = lake.read("studies")
    quarantine = lake.read("quarantine")
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

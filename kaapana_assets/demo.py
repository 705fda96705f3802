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
    console.print(
        "\nNext: [bold]make dev[/] opens the Dagster UI on http://localhost:3000 with these runs; "
        f"the Delta tables are under {home.lake}."
    )
    return 1 if failed else 0


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

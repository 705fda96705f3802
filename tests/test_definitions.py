"""The real code location loads, with every asset, job, sensor and resource wired."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tests.helpers import REPO


def test_definitions_load() -> None:
    import definitions

    defs = definitions.defs
    assert isinstance(defs, dg.Definitions)
    keys = {spec.key for spec in defs.resolve_all_asset_specs()}
    assert {dg.AssetKey("dicom_studies"), dg.AssetKey("quarantine")} <= keys
    assert defs.resolve_job_def("ingest_study").partitions_def is not None
    assert defs.get_sensor_def("incoming_studies") is not None
    # The automatic path: ingest and segmentation in one run, one process (its steps in-process).
    arrival = defs.resolve_job_def("ingest_and_segment")
    assert {n.name for n in arrival.graph.node_defs} == {"dicom_studies", "segmentations"}
    assert arrival.executor_def.name == "in_process" and "dagster-k8s/config" in arrival.tags
    assert {"lake", "archive", "federation", "federated_site"} <= set(defs.resources or {})
    federated = {"federated_plan", "federated_rounds", "federated_model", "site_fingerprint", "site_update",
                 "site_evaluation"}
    assert {dg.AssetKey(k) for k in federated} <= keys
    assert defs.get_sensor_def("federated_round_chain") is not None
    defs.resolve_implicit_global_asset_job_def()  # the asset graph resolves


def test_loading_the_code_location_imports_neither_torch_nor_flower() -> None:
    """Every run process imports the code location before its first step: torch and Flower
    (≈1.5 s) load only in the steps that train, predict or federate."""
    root = REPO
    probe = "import sys, definitions; print(sorted(m for m in ('torch', 'flwr', 'nnunetv2', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def _partitions(spec_partitions: object) -> str | None:
    if spec_partitions is None:
        return None
    name = getattr(spec_partitions, "name", None)
    if isinstance(spec_partitions, dg.MultiPartitionsDefinition):
        return "multi(" + ",".join(f"{d.name}:{_partitions(d.partitions_def)}" for d in spec_partitions.partitions_defs) + ")"
    return f"{type(spec_partitions).__name__}({name or ''})"


def describe(defs: dg.Definitions) -> dict[str, object]:
    """Every asset spec, check, job and sensor of the code location, as plain sorted data."""
    assets = {}
    graph = defs.resolve_asset_graph()
    for spec in defs.resolve_all_asset_specs():
        op = defs.resolve_assets_def(spec.key).op
        assets[spec.key.to_user_string()] = {
            "group": spec.group_name,
            "deps": sorted(dep.asset_key.to_user_string() for dep in spec.deps),
            "partitions": _partitions(spec.partitions_def),
            "kinds": sorted(spec.kinds or []),
            "automation": (spec.automation_condition.label or type(spec.automation_condition).__name__)
            if spec.automation_condition else None,
            "pool": op.pool,
            "op_tags": sorted(op.tags.keys()),
        }
    checks = {
        f"{key.asset_key.to_user_string()}:{key.name}": {"blocking": bool(graph.get_check_spec(key).blocking)}
        for key in graph.asset_check_keys
    }
    jobs = sorted(job.name for job in defs.resolve_all_job_defs())
    sensors = sorted(sensor.name for sensor in defs.sensors or [])
    return {"assets": dict(sorted(assets.items())), "checks": dict(sorted(checks.items())), "jobs": jobs,
            "sensors": sensors, "resources": sorted(defs.resources or {})}


def test_definitions_snapshot() -> None:
    """A changed graph is a visible diff. After an intended change:
    KAAPANA_UPDATE_SNAPSHOTS=1 pytest tests/test_definitions.py"""
    import definitions

    current = json.dumps(describe(definitions.defs), indent=1, sort_keys=True) + "\n"
    if os.environ.get("KAAPANA_UPDATE_SNAPSHOTS") or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(current)
    assert current == SNAPSHOT.read_text(), "the definitions changed: review, then KAAPANA_UPDATE_SNAPSHOTS=1"

"""The real code location loads, with every asset, job, sensor and resource wired."""

from __future__ import annotations

import dagster as dg


def test_definitions_load() -> None:
    import definitions

    defs = definitions.defs
    assert isinstance(defs, dg.Definitions)
    keys = {spec.key for spec in defs.resolve_all_asset_specs()}
    assert {dg.AssetKey("dicom_studies"), dg.AssetKey("quarantine")} <= keys
    assert defs.resolve_job_def("ingest_study").partitions_def is not None
    assert defs.get_sensor_def("incoming_studies") is not None
    assert {"lake", "archive", "federation", "federated_site"} <= set(defs.resources or {})
    federated = {"federated_plan", "federated_rounds", "federated_model", "site_fingerprint", "site_update",
                 "site_evaluation"}
    assert {dg.AssetKey(k) for k in federated} <= keys
    assert defs.get_sensor_def("federated_round_chain") is not None
    defs.resolve_implicit_global_asset_job_def()  # the asset graph resolves

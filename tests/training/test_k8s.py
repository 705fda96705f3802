"""Kubernetes: the step Jobs of GPU assets, built with dagster-k8s itself, and the deploy/ YAML."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_k8s import DagsterK8sJobConfig, construct_dagster_k8s_job
from dagster_k8s.job import get_user_defined_k8s_config

from kaapana_assets.federated.assets import site_update
from kaapana_assets.segmentation.assets import segmentations
from kaapana_assets.training.assets import trained_model
from tests.helpers import REPO

DEPLOY = REPO / "deploy"
GPU_ASSETS = [trained_model, segmentations, site_update]


def _job(asset: dg.AssetsDefinition):  # type: ignore[no-untyped-def]
    job_config = DagsterK8sJobConfig(job_image="registry.example.org/kaapana/kaapana-assets:0.1.0",
                                     dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance")
    user_config = get_user_defined_k8s_config(asset.op.tags)
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"step-{asset.key.path[-1]}",
                                     user_defined_k8s_config=user_config).to_dict()


@pytest.mark.parametrize("asset", GPU_ASSETS, ids=lambda a: a.key.path[-1])
def test_gpu_step_job_manifest(asset: dg.AssetsDefinition) -> None:
    job = _job(asset)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.items() if v is not None} for t in pod["tolerations"]]
    assert {"name": "kaapana-home", "mount_path": "/kaapana"}.items() <= {
        k: v for k, v in container["volume_mounts"][0].items() if v is not None}.items()
    assert pod["volumes"][0]["persistent_volume_claim"]["claim_name"] == "kaapana-home"
    assert asset.op.pool == "gpu"


def test_gpu_settings_come_from_the_environment() -> None:
    from kaapana_assets.environment import Environment
    from kaapana_assets.training.k8s import gpu_op_tags

    environ = {"KAAPANA_GPU_NODE_SELECTOR": '{"gpu": "a100"}', "KAAPANA_HOME_PVC": "site-data",
               "KAAPANA_GPU_TOLERATIONS": '[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]'}
    tags = {k: json.dumps(v) for k, v in gpu_op_tags(Environment.read(environ), gpus=2).items()}  # as Dagster stores op tags
    config = get_user_defined_k8s_config(tags)
    assert config.pod_spec_config["node_selector"] == {"gpu": "a100"}
    assert config.pod_spec_config["tolerations"][0]["key"] == "dedicated"
    assert config.pod_spec_config["volumes"][0]["persistent_volume_claim"]["claim_name"] == "site-data"
    assert config.container_config["resources"]["limits"]["nvidia.com/gpu"] == "2"
    with pytest.raises(ValueError, match="KAAPANA_GPU_TOLERATIONS must be JSON"):
        Environment.read({**environ, "KAAPANA_GPU_TOLERATIONS": "not json"})


def test_production_dagster_yaml_validates(tmp_path: Path) -> None:
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((DEPLOY / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert "postgres" in config["storage"]
    assert config["run_retries"]["enabled"] is True


def test_local_dagster_yaml_validates(tmp_path: Path) -> None:
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((DEPLOY.parent / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_executor_config_validates() -> None:
    from dagster_k8s import k8s_job_executor

    run_config = yaml.safe_load((DEPLOY / "executor.yaml").read_text())

    @dg.op
    def noop() -> None: ...

    @dg.job(executor_def=k8s_job_executor)
    def probe() -> None:
        noop()

    result = dg.validate_run_config(probe, run_config)
    assert result["execution"]["k8s"]["job_namespace"] == "kaapana"
    assert result["execution"]["k8s"]["step_k8s_config"]["pod_spec_config"]["node_selector"] == {"kaapana.io/role": "cpu"}


def test_helm_values_run_this_code_location() -> None:
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "definitions"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["KAAPANA_ENV"] == "k8s" and env["KAAPANA_LAKE_URI"].startswith("s3://")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"

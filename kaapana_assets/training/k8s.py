"""Kubernetes settings of GPU steps: op tags that dagster-k8s turns into the step's Job.

Node selector, tolerations and the shared volume come from the code location's
`Environment`, so a cluster is configured without code changes:
  KAAPANA_GPU_NODE_SELECTOR  JSON object   (default {"nvidia.com/gpu.present": "true"})
  KAAPANA_GPU_TOLERATIONS    JSON list     (default: tolerate the nvidia.com/gpu taint)
  KAAPANA_HOME_PVC           claim holding KAAPANA_HOME (default kaapana-home)
  KAAPANA_HOME               mount path in the container (default /kaapana)
The code location computes them once (resources/location.py).
"""

from __future__ import annotations

from typing import Any

from kaapana_assets.environment import Environment


def gpu_op_tags(environment: Environment, gpus: int = 1, memory: str = "24Gi", cpu: str = "4") -> dict[str, Any]:
    home, claim = environment.pod_home, environment.home_claim
    return {
        "dagster-k8s/config": {
            "container_config": {
                "resources": {
                    "limits": {"nvidia.com/gpu": str(gpus), "memory": memory},
                    "requests": {"cpu": cpu, "memory": memory},
                },
                "volume_mounts": [{"name": "kaapana-home", "mount_path": home}],
            },
            "pod_spec_config": {
                "node_selector": environment.gpu_node_selector,
                "tolerations": environment.gpu_tolerations,
                "volumes": [{"name": "kaapana-home", "persistent_volume_claim": {"claim_name": claim}}],
            },
        }
    }


GPU_POOL = "gpu"

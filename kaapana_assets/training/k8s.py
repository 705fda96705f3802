"""Kubernetes settings of GPU steps: op tags that dagster-k8s turns into the step's Job.

Node selector, tolerations and the shared volume come from the environment of the code
location, so a cluster is configured without code changes:
  KAAPANA_GPU_NODE_SELECTOR  JSON object   (default {"nvidia.com/gpu.present": "true"})
  KAAPANA_GPU_TOLERATIONS    JSON list     (default: tolerate the nvidia.com/gpu taint)
  KAAPANA_HOME_PVC           claim holding KAAPANA_HOME (default kaapana-home)
  KAAPANA_HOME               mount path in the container (default /kaapana)
"""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _json_env(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be JSON: {exc}") from None


def gpu_op_tags(gpus: int = 1, memory: str = "24Gi", cpu: str = "4") -> dict[str, Any]:
    home = os.environ.get("KAAPANA_HOME", "/kaapana") if os.environ.get("KAAPANA_ENV") == "k8s" else "/kaapana"
    claim = os.environ.get("KAAPANA_HOME_PVC", "kaapana-home")
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
                "node_selector": _json_env("KAAPANA_GPU_NODE_SELECTOR", DEFAULT_NODE_SELECTOR),
                "tolerations": _json_env("KAAPANA_GPU_TOLERATIONS", DEFAULT_TOLERATIONS),
                "volumes": [{"name": "kaapana-home", "persistent_volume_claim": {"claim_name": claim}}],
            },
        }
    }


GPU_POOL = "gpu"

"""How extensions run: a subprocess locally, a pod from an image on Kubernetes."""

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

PROGRAMS = Path(__file__).resolve().parents[1] / "kaapana_assets" / "extensions" / "programs"


class ExtensionRunner(dg.ConfigurableResource):
    mode: Literal["subprocess", "k8s"] = Field(default="subprocess", description="subprocess (local) or k8s (a pod)")
    image: str = Field(default="", description="k8s: the image that holds the programs (e.g. this code location's)")
    namespace: str = Field(default="", description="k8s: namespace of the pods; empty: the run's")
    home_claim: str = Field(default="kaapana-home", description="k8s: PVC holding KAAPANA_HOME, mounted read-only")
    mount_path: str = Field(default="/kaapana", description="k8s: where KAAPANA_HOME is mounted in the pod")

    def run(self, context: dg.AssetExecutionContext, program: str, extras: Mapping[str, Any]) -> Any:
        script = PROGRAMS / f"{program}.py"
        if self.mode == "subprocess":
            return dg.PipesSubprocessClient().run(
                context=context, command=[sys.executable, str(script)], extras=dict(extras),
            ).get_materialize_result()
        from dagster_k8s import PipesK8sClient

        home = self.mount_path
        return PipesK8sClient().run(
            context=context, image=self.image, namespace=self.namespace or None,
            command=["python", "-m", f"kaapana_assets.extensions.programs.{program}"], extras=dict(extras),
            base_pod_spec={
                "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": self.home_claim, "readOnly": True}}],
                "containers": [{"name": "dagster-pipes-execution",
                                "volumeMounts": [{"name": "home", "mountPath": home, "readOnly": True}]}],
            },
        ).get_materialize_result()

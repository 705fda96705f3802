"""deploy/dicomweb.yaml: the DICOMweb service on Kubernetes runs `kaapana dicomweb` as the
command line parses it, from the user code's image, over the same volume and lake, read-only."""

from __future__ import annotations

import yaml

from kaapana_assets.cli import build_parser
from tests.helpers import REPO

DEPLOY = REPO / "deploy"


def test_the_deployment_serves_the_code_locations_archive_and_lake_read_only() -> None:
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    (user_code,) = values["dagster-user-deployments"]["deployments"]
    documents = [d for d in yaml.safe_load_all((DEPLOY / "dicomweb.yaml").read_text()) if d]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    (service,) = [d for d in documents if d["kind"] == "Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"{user_code['image']['repository']}:{user_code['image']['tag']}"

    # The command as `kaapana` parses it: read-only (no --stow), the viewer, the home mounted.
    command = container["command"] + container["args"]
    assert command[0] == "kaapana"
    args = build_parser().parse_args(command[1:])
    assert args.command == "dicomweb" and not args.stow and args.viewer == "/opt/ohif/dist"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kaapana-home"]
    assert mount["mountPath"] == args.home and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (home_volume,) = [v for v in user_code["volumes"] if v["name"] == "kaapana-home"]
    assert volume["persistentVolumeClaim"] == home_volume["persistentVolumeClaim"]

    # The index where the user code writes it.
    env = {e["name"]: e["value"] for e in container["env"]}
    user_env = {e["name"]: e["value"] for e in user_code["env"]}
    for name in ("KAAPANA_ENV", "KAAPANA_HOME", "KAAPANA_LAKE_URI"):
        assert env[name] == user_env[name], name
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == [s["name"] for s in user_code["envSecrets"]]

    # The Service reaches the container's port, the one the command binds.
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    assert service["spec"]["type"] == "ClusterIP"  # browsers come through the ingress, not a load balancer

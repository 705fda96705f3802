"""deploy/receiver.yaml: the receiver on Kubernetes runs `kaapana receive` as the command line
parses it, one pod with as many workers as its CPU limit, on the user code's volume, and stops
within the pod's grace period."""

from __future__ import annotations

import yaml

from kaapana_assets.cli import build_parser
from kaapana_assets.ingest.headers import MAX_INFLATED_BYTES
from kaapana_assets.network.workers import STOP_GRACE_S
from tests.helpers import REPO

DEPLOY = REPO / "deploy"
WORKER_MIB = 75  # a worker's resident memory, as docs/deployment.md measures it


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else float(quantity) / 2**20


def test_one_receiver_pod_with_a_worker_per_core_on_the_user_codes_volume() -> None:
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    (user_code,) = values["dagster-user-deployments"]["deployments"]
    documents = [d for d in yaml.safe_load_all((DEPLOY / "receiver.yaml").read_text()) if d]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    (service,) = [d for d in documents if d["kind"] == "Service"]
    # One pod over one journal, never two: the limits count over one pod's workers.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"{user_code['image']['repository']}:{user_code['image']['tag']}"

    command = container["command"] + container["args"]
    assert command[0] == "kaapana"
    args = build_parser().parse_args(command[1:])
    assert args.command == "receive" and args.host == "0.0.0.0"
    limits = container["resources"]["limits"]
    assert args.workers == int(limits["cpu"]) >= 2  # os.cpu_count() would read the node's cores
    assert _mib(limits["memory"]) >= args.workers * (WORKER_MIB + MAX_INFLATED_BYTES / 2**20)
    assert pod["terminationGracePeriodSeconds"] > STOP_GRACE_S  # the supervisor's own deadline first

    # The spool in the home the user code's sensor ingests, on its volume, writable.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kaapana-home"]
    assert mount["mountPath"] == args.home and not mount.get("readOnly", False)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (home_volume,) = [v for v in user_code["volumes"] if v["name"] == "kaapana-home"]
    assert volume["persistentVolumeClaim"] == home_volume["persistentVolumeClaim"]
    env = {e["name"]: e["value"] for e in container["env"]}
    user_env = {e["name"]: e["value"] for e in user_code["env"]}
    for name in ("KAAPANA_ENV", "KAAPANA_HOME"):
        assert env[name] == user_env[name], name

    # The Service reaches the port the command binds and keeps the caller's address.
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # --max-per-caller counts by address

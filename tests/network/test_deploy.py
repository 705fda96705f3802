"""deploy/receiver.yaml: the receiver on Kubernetes runs `kaapana receive` as the command line
parses it, one pod with as many workers as its CPU limit, on the user code's volume, and stops
within the pod's grace period."""

from __future__ import annotations

from kaapana_assets.ingest.headers import MAX_INFLATED_BYTES
from kaapana_assets.network.workers import STOP_GRACE_S
from tests.helpers import deployed

WORKER_MIB = 75  # a worker's resident memory, as docs/deployment.md measures it


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else float(quantity) / 2**20


def test_one_receiver_pod_with_a_worker_per_core_on_the_user_codes_volume() -> None:
    receiver = deployed("receiver.yaml")
    container, args, deployment = receiver.container, receiver.args, receiver.deployment
    # One pod over one journal, never two: the limits count over one pod's workers.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert args.command == "receive" and args.host == "0.0.0.0"
    limits = container["resources"]["limits"]
    assert args.workers == int(limits["cpu"]) >= 2  # os.cpu_count() would read the node's cores
    assert _mib(limits["memory"]) >= args.workers * (WORKER_MIB + MAX_INFLATED_BYTES / 2**20)
    assert receiver.pod["terminationGracePeriodSeconds"] > STOP_GRACE_S  # the supervisor's own deadline first

    # The spool in the home the user code's sensor ingests, on its volume, writable.
    assert not receiver.home_mount().get("readOnly", False)
    receiver.assert_environment_of_user_code("KAAPANA_ENV", "KAAPANA_HOME")

    # The Service reaches the port the command binds and keeps the caller's address.
    receiver.assert_service_reaches_the_port()
    assert receiver.service["spec"]["externalTrafficPolicy"] == "Local"  # --max-per-caller counts by address

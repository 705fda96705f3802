"""deploy/dicomweb.yaml: the DICOMweb service on Kubernetes runs `kaapana dicomweb` as the
command line parses it, from the user code's image, over the same volume and lake, read-only."""

from __future__ import annotations

from tests.helpers import deployed


def test_the_deployment_serves_the_code_locations_archive_and_lake_read_only() -> None:
    dicomweb = deployed("dicomweb.yaml")
    container, args, user_code = dicomweb.container, dicomweb.args, dicomweb.user_code

    # The command as `kaapana` parses it: read-only (no --stow), the viewer, the home mounted.
    assert args.command == "dicomweb" and not args.stow and args.viewer == "/opt/ohif/dist"
    assert dicomweb.home_mount()["readOnly"] is True

    # The index where the user code writes it.
    dicomweb.assert_environment_of_user_code("KAAPANA_ENV", "KAAPANA_HOME", "KAAPANA_LAKE_URI")
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == [s["name"] for s in user_code["envSecrets"]]

    # The Service reaches the container's port, the one the command binds.
    dicomweb.assert_service_reaches_the_port()
    assert dicomweb.service["spec"]["type"] == "ClusterIP"  # browsers come through the ingress, not a load balancer

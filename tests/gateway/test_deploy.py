"""deploy/gateway.yaml: `kaapana gateway` as the command line parses it, its secrets mounted
where its arguments read them, and the DICOMweb pod given the same identity secret."""

from __future__ import annotations

import yaml

from kaapana_assets.cli import build_parser
from tests.helpers import REPO

DEPLOY = REPO / "deploy"


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _secret_files(pod: dict, container: dict) -> dict[str, tuple[str, str]]:
    """Mounted file path → (Secret name, key)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            keys = [i["key"] for i in secret.get("items", [])] or [
                "client-secret", "session-secret", "identity-secret", "issuer", "client-id"]
            files.update({f"{mount['mountPath']}/{key}": (secret["secretName"], key) for key in keys})
    return files


def test_the_gateway_reads_its_secrets_from_the_secret_and_shares_the_identity_secret() -> None:
    (gateway,) = [d for d in _documents("gateway.yaml") if d["kind"] == "Deployment"]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "gateway" and args.https_only
    files = _secret_files(pod, container)
    assert files[args.client_secret_file] == ("kaapana-gateway", "client-secret")
    assert files[args.session_secret_file] == ("kaapana-gateway", "session-secret")
    assert files[args.identity_secret_file] == ("kaapana-gateway", "identity-secret")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert args.issuer == "$(OIDC_ISSUER)" and env["OIDC_ISSUER"] == {"name": "kaapana-gateway", "key": "issuer"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["platform"], ports["viewer"]) == (args.port, args.viewer_port)

    (dicomweb,) = [d for d in _documents("dicomweb.yaml") if d["kind"] == "Deployment"]
    dicomweb_pod = dicomweb["spec"]["template"]["spec"]
    (dicomweb_container,) = dicomweb_pod["containers"]
    dicomweb_args = build_parser().parse_args(dicomweb_container["args"])
    assert _secret_files(dicomweb_pod, dicomweb_container)[dicomweb_args.identity_secret_file] == (
        "kaapana-gateway", "identity-secret")
    assert args.dicomweb.endswith(f":{dicomweb_args.port}")
    policies = [d for d in _documents("gateway.yaml") if d["kind"] == "NetworkPolicy"]
    assert {p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") for p in policies} >= {
        "kaapana-dicomweb"}

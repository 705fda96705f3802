"""`kaapana federation ...`: the credentials, the Flower command lines, registering a
SuperNode at a real SuperLink, and the Kubernetes manifests of both ends."""

from __future__ import annotations

import base64
import ipaddress
import shlex
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kaapana_assets.cli import main
from tests.helpers import REPO

DEPLOY = REPO / "deploy"


def test_key_prints_32_bytes_of_base64(capsys: pytest.CaptureFixture) -> None:
    assert main(["federation", "key"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == 1  # the key alone: a script pipes it on
    assert len(base64.b64decode(out.strip(), validate=True)) == 32
    assert main(["federation", "key"]) == 0
    assert capsys.readouterr().out != out  # a new key every time


def test_certificates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "certificates"
    assert main(["federation", "certificates", "--host", "hub.example.org", "--host", "10.1.2.3",
                 "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "ca.pem → every site" in printed and "server.key → stays at the hub" in printed
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), password=None)
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert cert.issuer == ca.subject
    assert cert.public_key() == key.public_key()
    # the CA is in use at every site: a second run does not replace it unasked
    before = (out / "ca.pem").read_bytes()
    assert main(["federation", "certificates", "--host", "other", "--out", str(out)]) == 1
    assert (out / "ca.pem").read_bytes() == before
    assert main(["federation", "certificates", "--host", "other", "--out", str(out), "--force"]) == 0
    assert (out / "ca.pem").read_bytes() != before


def test_node_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["federation", "node-keys", "site-a", "--out", str(tmp_path)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "site-a.pub → to the hub administrator" in printed and "site-a.key → stays at the site" in printed
    public = serialization.load_ssh_public_key((tmp_path / "site-a.pub").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name in ("secp256r1", "secp384r1", "secp521r1")  # the NIST curves Flower accepts
    private = serialization.load_ssh_private_key((tmp_path / "site-a.key").read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.public_key() == public
    assert (tmp_path / "site-a.key").stat().st_mode & 0o777 == 0o600
    assert main(["federation", "node-keys", "site-a", "--out", str(tmp_path)]) == 1  # registered keys stay
    assert main(["federation", "node-keys", "../escape", "--out", str(tmp_path)]) == 2


def test_superlink_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    certificates = tmp_path / "certificates"
    assert main(["federation", "superlink-command", "--certificates", str(certificates),
                 "--database", str(tmp_path / "state.db")]) == 0
    captured = capsys.readouterr()
    command = shlex.split(captured.out)  # stdout is the command line alone
    assert Path(command[0]).name == "flower-superlink"
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in command
    assert command[command.index("--ssl-certfile") + 1] == str(certificates / "server.pem")
    assert command[command.index("--ssl-keyfile") + 1] == str(certificates / "server.key")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(certificates / "ca.pem")
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "9092"
    assert command[command.index("--database") + 1] == str(tmp_path / "state.db")
    assert "--insecure" not in command
    assert "port 9092" in " ".join(captured.err.split())


def test_supernode_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "site home"  # a space: the printed line must still be one shell word per argument
    assert main(["federation", "supernode-command", "--site", "site-a", "--home", str(home),
                 "--superlink", "hub.example.org:9092", "--ca", "/secrets/ca.pem", "--node-key", "/secrets/site-a.key",
                 "--device", "cpu", "--threads", "4", "--share-local-model"]) == 0
    captured = capsys.readouterr()
    command, superexec = (shlex.split(line) for line in captured.out.strip().splitlines())
    assert Path(command[0]).name == "flower-supernode"
    assert command[command.index("--isolation") + 1] == "process"
    assert Path(superexec[0]).name == "kaapana-superexec"
    assert superexec[superexec.index("--runtime-api-address") + 1] == f"127.0.0.1:{command[command.index('--port') + 1]}"
    assert command[command.index("--superlink") + 1] == "hub.example.org:9092"
    assert command[command.index("--root-certificates") + 1] == "/secrets/ca.pem"
    assert command[command.index("--auth-supernode-private-key") + 1] == "/secrets/site-a.key"
    node_config = command[command.index("--node-config") + 1]
    assert f'kaapana-home="{home}"' in node_config and 'site="site-a"' in node_config
    assert 'device="cpu"' in node_config and "threads=4" in node_config
    assert 'share-local-model="true"' in node_config  # the site's consent to cross-site evaluation
    assert command[command.index("--host") + 1] == "127.0.0.1"  # the runtime API stays on loopback
    assert "--insecure" not in command
    notes = " ".join(captured.err.split())
    assert "KAAPANA_SITE_KEY" in notes and "no inbound port" in notes and "127.0.0.1" in notes
    assert main(["federation", "supernode-command", "--site", "a/b", "--home", str(home), "--superlink", "h:1",
                 "--ca", "ca.pem", "--node-key", "k"]) == 2


def test_register_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "ca.pem").write_text("")
    assert main(["federation", "register", str(tmp_path / "nope.pub"), "--superlink", "127.0.0.1:1",
                 "--ca", str(tmp_path / "ca.pem"), "--flwr-home", str(tmp_path / "flwr")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_register_at_a_real_superlink(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kaapana_assets.federation.credentials import create_node_keys
    from kaapana_assets.federation.local import LocalFederation

    federation = LocalFederation(tmp_path / "hub", sites=[])
    try:
        federation.connection.write_config()
        federation.start_superlink()
        _, public = create_node_keys(tmp_path / "keys", "site-a")
        argv = ["federation", "register", str(public), "--superlink", federation.connection.address,
                "--ca", str(federation.certificates["ca"]), "--flwr-home", str(tmp_path / "flwr")]
        assert main(argv) == 0, capsys.readouterr().out
        assert "registered" in capsys.readouterr().out
        assert (tmp_path / "flwr" / "config.toml").exists()
        # Flower refuses the same key twice: the command reports it and fails
        assert main(argv) == 1
    finally:
        federation.close()
    assert federation.superlink is None
    assert not list((tmp_path / "hub").rglob("*.db"))  # the local SuperLink's state lived in memory


def test_the_in_memory_state_is_flowers() -> None:
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    from kaapana_assets.federation.superlink import IN_MEMORY_STATE

    assert IN_MEMORY_STATE == FLWR_IN_MEMORY_DB_NAME


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _container(deployment: dict, name: str | None = None) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        (container,) = containers
        return container
    (container,) = [c for c in containers if c["name"] == name]
    return container


def test_deploy_manifests() -> None:
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    user_code = values["dagster-user-deployments"]["deployments"][0]["image"]
    image = f"{user_code['repository']}:{user_code['tag']}"

    hub = _documents("flower-superlink.yaml")
    kinds = [d["kind"] for d in hub]
    assert kinds.count("Deployment") == 1 and kinds.count("Service") == 1
    (deployment,) = [d for d in hub if d["kind"] == "Deployment"]
    superlink = _container(deployment)
    assert superlink["image"] == image
    args = superlink["command"] + superlink.get("args", [])
    assert args[0] == "flower-superlink"
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile",
                 "--ssl-keyfile", "--ssl-ca-certfile", "--database"):
        assert flag in args
    assert "--insecure" not in args
    assert {"name": "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "value": "1"} in superlink["env"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert any("secret" in v for v in volumes) and any("persistentVolumeClaim" in v for v in volumes)
    (service,) = [d for d in hub if d["kind"] == "Service"]
    assert [p["port"] for p in service["spec"]["ports"]] == [9092]

    site = _documents("flower-supernode.yaml")
    kinds = [d["kind"] for d in site]
    assert "Service" not in kinds  # the site opens no inbound port
    assert kinds.count("Deployment") == 1 and kinds.count("NetworkPolicy") == 1
    (deployment,) = [d for d in site if d["kind"] == "Deployment"]
    supernode, superexec = _container(deployment, "supernode"), _container(deployment, "superexec")
    assert supernode["image"] == image == superexec["image"]
    assert "ports" not in supernode and "ports" not in superexec
    args = supernode["command"] + supernode.get("args", [])
    assert args[0] == "flower-supernode"
    assert args[args.index("--isolation") + 1] == "process"
    superexec_args = superexec["command"] + superexec["args"]
    assert superexec_args[0] == "kaapana-superexec"
    assert superexec_args[superexec_args.index("--runtime-api-address") + 1] == f"127.0.0.1:{args[args.index('--port') + 1]}"
    assert superexec["resources"]["limits"]["nvidia.com/gpu"] == 1  # the ClientApps train in this container
    for flag in ("--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config"):
        assert flag in args
    node_config = args[args.index("--node-config") + 1]
    assert 'kaapana-home="/kaapana"' in node_config and "site=" in node_config
    assert args[args.index("--host") + 1] == "127.0.0.1"
    env = {e["name"]: e for e in superexec["env"]}
    assert "secretKeyRef" in env["KAAPANA_SITE_KEY"]["valueFrom"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert any("secret" in v for v in volumes) and any("persistentVolumeClaim" in v for v in volumes)
    (policy,) = [d for d in site if d["kind"] == "NetworkPolicy"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not policy["spec"].get("ingress")  # no ingress rule: all ingress denied
    egress_ports = {(p.get("protocol", "TCP"), p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert ("TCP", 9092) in egress_ports and ("UDP", 53) in egress_ports

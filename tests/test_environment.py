"""The environment is read in one place; resources get explicit values (what the UI shows)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import dagster as dg
import pytest

from kaapana_assets.environment import Environment, EnvironmentKind
from resources import build_resources
from tests.helpers import REPO


def test_local_resources_carry_the_values_in_use(tmp_path: Path) -> None:
    env = Environment.read({"KAAPANA_HOME": str(tmp_path), "KAAPANA_SITE": "site-x", "KAAPANA_SITE_KEY": "secret",
                            "KAAPANA_FEDERATION": "/etc/federation.yaml", "KAAPANA_TRAINING_SCHEDULE": "tiny"})
    resources = build_resources(env)
    assert resources["archive"].home == str(tmp_path) and resources["archive"].site == "site-x"
    assert resources["lake"].uri == str(tmp_path / "lake")
    assert resources["mlflow"].tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resources["nnunet_settings"].workdir == str(tmp_path / "nnunet")
    assert resources["nnunet_settings"].schedule == "tiny"
    assert resources["federation"].federation_file == "/etc/federation.yaml"
    assert resources["federation"].folder == str(tmp_path / "federation" / "hub")
    assert resources["federated_site"].folder == str(tmp_path / "federation" / "site")
    assert resources["federation"].superlink == "127.0.0.1:9092" and resources["federation"].root_certificate == ""
    env = Environment.read({"KAAPANA_HOME": str(tmp_path), "KAAPANA_SUPERLINK": "hub.example.org:9092",
                            "KAAPANA_SUPERLINK_CA": "/etc/kaapana/ca.pem"})
    federation = build_resources(env)["federation"]
    assert (federation.superlink, federation.root_certificate) == ("hub.example.org:9092", "/etc/kaapana/ca.pem")


def test_k8s_resources() -> None:
    env = Environment.read({"KAAPANA_ENV": "k8s", "KAAPANA_HOME": "/data/kaapana", "KAAPANA_EXTENSION_IMAGE": "img:1"})
    resources = build_resources(env)
    assert env.env is EnvironmentKind.K8S
    assert isinstance(resources["lake"].uri, dg.EnvVar)
    assert resources["nnunet_settings"].device == "cuda" and resources["nnunet_settings"].schedule == "full"
    assert resources["extensions"].mode == "k8s" and resources["extensions"].mount_path == "/data/kaapana"
    with pytest.raises(ValueError, match="KAAPANA_ENV must be 'local' or 'k8s', not 'cloud'"):
        Environment.read({"KAAPANA_ENV": "cloud"})


READS = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bEnvironment\.read\(")
# Handing this process's environment on to a child process is not reading configuration.
PASSED_ON = re.compile(r"\{\*\*os\.environ\b|\bdict\(os\.environ\)")
# The tops: each reads the environment once at its start and passes values down. A key is a
# file, a folder, or `file::function` (the one function of the file that may).
TOPS = {
    "kaapana_assets/environment.py": "the one reader",
    "kaapana_assets/cli/": "the `kaapana` command: each subcommand is the top of its process",
    "kaapana_assets/demo.py": "`kaapana demo`: the top of its process (it also sets DAGSTER_HOME and the federation file)",
    "resources/location.py::<module>": "the code location's one reading (op tags are fixed when the asset modules import)",
    "kaapana_assets/monitoring/exporter.py::main": "`python -m kaapana_assets.monitoring.exporter`: its process's top",
    "kaapana_assets/client/api.py::Kaapana.__init__": "`Kaapana()`: the Python client, the top of a notebook",
    "kaapana_assets/federation/clientapp.py::SiteSettings.from_context": "the Flower ClientApp, started by the site's "
    "SuperNode in a process of its own: its settings are its top; KAAPANA_SITE_KEY is a secret, read where used",
    "kaapana_assets/federation/sites.py::SiteEntry.secret": "the secret a federation file names (key_env): read where "
    "it is used, never held in an Environment or a resource's config",
    "kaapana_assets/federation/warm_superexec.py::main": "`kaapana-superexec`: sets a variable for the ClientApps it forks",
    "kaapana_assets/nnunet/paths.py::nnunet_environment": "sets nnU-Net's own variables around a call (nnunetv2.paths "
    "reads them); it reads none",
}


def _functions(tree: ast.AST) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function, outermost first."""
    found: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((child.lineno, child.end_lineno or child.lineno, name))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _top(relative: str, function: str) -> bool:
    for key in TOPS:
        file, _, name = key.partition("::")
        if (relative == file or file.endswith("/") and relative.startswith(file)) and name in ("", function):
            return True
    return False


def test_nothing_below_the_top_reads_the_environment() -> None:
    """Only the tops read the environment (os.environ, os.getenv, Environment.read): every
    module under kaapana_assets/, resources/ and sensors/ gets its values passed down."""
    readers = []
    for path in sorted([*REPO.glob("resources/*.py"), *REPO.glob("sensors/*.py"), *REPO.glob("kaapana_assets/**/*.py")]):
        relative = str(path.relative_to(REPO))
        text = path.read_text()
        functions = _functions(ast.parse(text))
        for number, line in enumerate(text.splitlines(), 1):
            if not READS.search(PASSED_ON.sub("", line)):
                continue
            # The innermost function holding the line.
            within = [name for first, last, name in functions if first <= number <= last]
            function = within[-1] if within else "<module>"
            if not _top(relative, function):
                readers.append(f"{relative}:{number} ({function}): {line.strip()}")
    assert readers == [], "read the environment at the top and pass the values down:\n" + "\n".join(readers)


def test_resources_need_their_values() -> None:
    """No resource falls back to the environment: what it needs is a required field."""
    from pydantic import ValidationError

    from resources import (
        ArchiveResource,
        FederatedSiteResource,
        FederationResource,
        LakeResource,
        MlflowResource,
        NnunetResource,
    )

    for resource in (ArchiveResource, FederatedSiteResource, FederationResource, LakeResource, MlflowResource,
                     NnunetResource):
        with pytest.raises(ValidationError):
            resource()


def test_mlflow_activation_leaves_the_environment_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a process serving several homes
    (the demo after another site, a code server) would then read another home's store."""
    import mlflow

    from kaapana_assets.training.tracking import Tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracking(uri, str(tmp_path / "artifacts")).client()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == uri  # the fluent API still logs to this store
    home = tmp_path / "other"
    assert Environment.read(home=home).mlflow_tracking_uri == f"sqlite:///{home / 'mlflow.db'}"


def test_a_lake_on_s3_gets_its_settings_and_the_ui_no_secret() -> None:
    env = Environment.read({"KAAPANA_LAKE_URI": "s3://lake/site-a", "AWS_ENDPOINT_URL": "http://minio:9000",
                            "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret",
                            "KAAPANA_LAKE_UNSAFE_STORE": "allow"})
    assert env.lake_storage_options == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "us-east-1",
                                        "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "id",
                                        "AWS_SECRET_ACCESS_KEY": "secret"}
    assert "secret" not in repr(env) and env.lake_unsafe_store
    lake = build_resources(env)["lake"]
    assert lake.storage_options == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "us-east-1",
                                    "AWS_ALLOW_HTTP": "true"}
    assert isinstance(lake.secret_access_key, dg.EnvVar) and lake.unsafe_store_allowed
    assert Environment.read({"KAAPANA_HOME": "/data"}).lake_storage_options == {}  # a folder needs none
    with pytest.raises(ValueError, match="KAAPANA_LAKE_UNSAFE_STORE must be 'allow' or 'refuse', not 'yes'"):
        Environment.read({"KAAPANA_LAKE_UNSAFE_STORE": "yes"})


def test_a_tracking_server_keeps_the_models_where_its_artifacts_destination_says(tmp_path: Path) -> None:
    assert Environment.read({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).mlflow_artifacts == ""
    assert Environment.read({"KAAPANA_HOME": str(tmp_path)}).mlflow_artifacts == (tmp_path / "mlartifacts").as_uri()

"""The environment is read in one place; resources get explicit values (what the UI shows)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import dagster as dg
import pytest

from kaapana_assets.environment import Environment
from resources import build_resources

ROOT = Path(__file__).resolve().parents[1]


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
    assert isinstance(resources["lake"].uri, dg.EnvVar)
    assert resources["nnunet_settings"].device == "cuda" and resources["nnunet_settings"].schedule == "full"
    assert resources["extensions"].mode == "k8s" and resources["extensions"].mount_path == "/data/kaapana"
    with pytest.raises(ValueError, match="KAAPANA_ENV"):
        Environment.read({"KAAPANA_ENV": "cloud"})


def test_no_resource_reads_the_environment_itself() -> None:
    """Only kaapana_assets/environment.py reads os.environ (and a federation file's named
    secret; and the site's ClientApp, which Flower starts in its own process, its key)."""
    readers = []
    for path in [*ROOT.glob("resources/*.py"), *ROOT.glob("sensors/*.py"), *ROOT.glob("kaapana_assets/**/*.py")]:
        text = path.read_text()
        for line in text.splitlines():
            if re.search(r"os\.environ\.get|os\.getenv|os\.environ\[", line) and "key_env" not in line:
                readers.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    allowed = ("kaapana_assets/environment.py", "kaapana_assets/training/nnunet.py", "kaapana_assets/cli",
               "kaapana_assets/demo", "kaapana_assets/federated/clientapp.py")
    # nnunet.py sets nnU-Net's own variables around a call
    allowed += ("kaapana_assets/federation/clientapp.py",)  # the ClientApp moved from federated/ (issue #34)
    assert [r for r in readers if not r.startswith(allowed)] == []


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

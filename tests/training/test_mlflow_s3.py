"""MLflow's artifacts on the lake's object store: a tracking server with
--artifacts-destination s3://… (MLFLOW_S3_ENDPOINT_URL: moto's S3 server), a model
logged and registered through it and loaded back into a pod's model cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from bench.s3_server import REGION, S3Server
from kaapana_assets.federation.local import free_port
from kaapana_assets.nnunet.registry import find_version
from kaapana_assets.segmentation.models import production_model
from kaapana_assets.training.tracking import Tracking

pytestmark = pytest.mark.slow


def test_a_model_goes_to_the_object_store_and_back_into_the_model_cache(
        trained_site, s3_server: S3Server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trained = trained_site.tracking()
    folder = trained.download(find_version(trained, "nnunet-liver-train"), tmp_path / "trained")
    port = free_port()
    env = {**os.environ, **s3_server.options(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
           "AWS_DEFAULT_REGION": REGION}
    log = tmp_path / "mlflow-server.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--workers", "1",
         "--artifacts-destination", f"s3://{s3_server.bucket}/mlartifacts"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # its imports take minutes on a loaded 2-core machine
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        # No artifact root of our own: the server proxies artifacts to its destination.
        tracking = Tracking(f"http://127.0.0.1:{port}", "")
        with tracking.run("train liver-train") as run:  # as training/run.py logs and registers a model
            mlflow.log_artifacts(str(folder), "model")
        version = tracking.register(run.info.run_id, "model", "nnunet-liver-train", tags={"kaapana.cohort": "liver-train"})
        tracking.promote("nnunet-liver-train", version.version)
        stored = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="mlartifacts/")
        keys = [item["Key"] for item in stored.get("Contents", [])]
        assert any(k.endswith("model/dataset.json") for k in keys) and any(k.endswith(".pth") for k in keys), keys

        cache = tmp_path / "pod" / "models"  # a fresh pod: nothing cached yet
        model = production_model(tracking, "nnunet-liver-train", cache, "cpu")
        assert model.version == str(version.version)
        assert (cache / "nnunet-liver-train" / f"v{version.version}" / "dataset.json").is_file()
        assert model.label_names and "liver" in model.label_names.values()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

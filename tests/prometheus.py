"""A real Prometheus (Debian's `prometheus` package) for tests: started on loopback with a
scrape config of our own, queried through its HTTP API, ended by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

from kaapana_assets.federation.local import free_port
from tests.tools import require


@contextmanager
def running_prometheus(folder: Path, targets: Mapping[str, Sequence[str]], interval: str = "1s") -> Iterator[str]:
    """Prometheus scraping `targets` (job -> host:port list) every `interval`; yields its URL."""
    require("prometheus")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(hosts)}]}
                                 for job, hosts in targets.items()]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(folder / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}: "
                                   + (folder / "prometheus.log").read_text()[-2000:])
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus not ready after 60 s")
            time.sleep(0.2)
        yield url
    finally:
        # Only the process group we started, by its id.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


def query(url: str, expr: str) -> list[dict]:
    """An instant query; raises unless Prometheus answered `success`."""
    answer = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    if answer.get("status") != "success":
        raise AssertionError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
    return list(answer["data"]["result"])


def wait_for_scrape(url: str, job: str, timeout_s: float = 60.0) -> None:
    """Until every target of `job` was scraped successfully at least once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        up = query(url, f'up{{job="{job}"}}')
        if up and all(float(sample["value"][1]) == 1.0 for sample in up):
            return
        time.sleep(0.3)
    raise TimeoutError(f"job {job} was not scraped within {timeout_s:.0f} s")


def values(url: str, selector: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series matching `selector`: its labels (without job and instance) -> value."""
    out = {}
    for sample in query(url, selector):
        labels = tuple(sorted((k, v) for k, v in sample["metric"].items() if k not in ("job", "instance")))
        out[labels] = float(sample["value"][1])
    return out

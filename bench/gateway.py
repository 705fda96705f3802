"""The gateway's latency over direct access: QIDO-RS study searches and a Dagster GraphQL
query, each sent straight to the service and through `kaapana gateway`, alternating, repeated.

    python bench/gateway.py [--studies 500] [--repeats 200]

Sets up what the tests use (bench/oidc_provider.py): panva's oidc-provider under Node (`make
oidc-provider`), a home of `--studies` single-slice CT studies (bench/dicomweb_qido.py's) all in
one project, `kaapana dicomweb` behind the identity header, a Dagster webserver over a one-asset
code location, and the gateway in front of both. A scientist of the project sends every request
with a bearer token over one kept-alive connection per side; the direct side sends the signed
identity header the gateway would. Prints the medians, the 90th percentiles and their ratio
(gateway / direct; the goal is ≤ 1.2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kaapana_assets.federation.local import stop as stop_process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRAPHQL = {"query": "{ runsOrError { ... on Runs { results { runId status } } } }"}
QIDO = "/dicom-web/studies?limit=100"


class Webserver:
    """`dagster-webserver` over bench/gateway_location.py, in its own DAGSTER_HOME."""

    def __init__(self, workdir: Path) -> None:
        import httpx

        from kaapana_assets.federation.local import free_port

        (workdir / "home").mkdir(parents=True)
        (workdir / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        self.url = f"127.0.0.1:{free_port()}"
        host, port = self.url.split(":")
        self.log = (workdir / "webserver.log").open("wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-h", host, "-p", port,
             "-f", str(ROOT / "bench" / "gateway_location.py")], cwd=workdir, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "DAGSTER_HOME": str(workdir / "home"), "DAGSTER_DISABLE_TELEMETRY": "1"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.post(f"http://{self.url}/graphql", json={"query": "{ version }"}, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"dagster-webserver did not start: {(workdir / 'webserver.log').read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process(self.proc, grace_s=30)
        self.log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    import httpx
    import pyarrow as pa

    from bench.dicomweb_qido import generate
    from bench.dicomweb_server import DicomwebServer
    from bench.gateway_server import GatewayServer
    from bench.oidc_provider import AUDIENCE, CLIENT_ID, CLIENT_SECRET, PROJECT_A, SCIENTIST_A, SCOPE, running_provider
    from kaapana_assets.access.identity import IDENTITY_HEADER, Identity, Role, sign_header
    from kaapana_assets.archive.service import Archive
    from kaapana_assets.home import KaapanaHome
    from kaapana_assets.ingest.pipeline import ingest_files
    from kaapana_assets.lake import Lake
    from kaapana_assets.lake.schemas import SERIES, SERIES_PROJECTS

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, running_provider() as provider:
        root = Path(tmp)
        home = KaapanaHome(root / "home").ensure()
        started = time.perf_counter()
        files = generate(root / "studies", args.studies)
        ingest_files(files, Archive.for_home(home), remove_sources=False)
        lake = Lake(home.lake)
        series = lake.read(SERIES).select("series_uid", "study_uid").to_dicts()
        lake.merge(SERIES_PROJECTS, pa.Table.from_pylist(
            [dict(s, project=PROJECT_A, assigned_by="operator", assigned_at=dt.datetime.now(dt.UTC)) for s in series],
            schema=SERIES_PROJECTS.schema))
        print(f"setup: {args.studies} studies generated and ingested in {time.perf_counter() - started:.0f} s")
        secret_file = root / "identity-secret"
        secret_file.write_text(secrets.token_urlsafe(32))
        secret = secret_file.read_text().encode()
        dicomweb = DicomwebServer(home.root, ("--identity-secret-file", str(secret_file)))
        webserver = Webserver(root / "dagster")
        gateway = None
        try:
            gateway = GatewayServer(root / "gateway", home.root, provider.issuer, CLIENT_ID, CLIENT_SECRET, AUDIENCE,
                                    {"dagster": f"http://{webserver.url}",
                                     "dicomweb": f"http://127.0.0.1:{dicomweb.port}"}, secret_file, scope=SCOPE)
            token = provider.tokens(SCIENTIST_A).access_token
            scientist = Identity(SCIENTIST_A, frozenset({Role.SCIENTIST}), frozenset({PROJECT_A}))
            through = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            direct_dicomweb = httpx.Client(base_url=f"http://127.0.0.1:{dicomweb.port}", timeout=60)
            direct_dagster = httpx.Client(base_url=f"http://{webserver.url}", timeout=60)

            def qido(client: httpx.Client, signed: bool) -> float:
                headers = {IDENTITY_HEADER: sign_header(scientist, secret)} if signed else {}
                t0 = time.perf_counter()
                answer = client.get(QIDO, headers=headers)
                elapsed = time.perf_counter() - t0
                assert answer.status_code == 200 and len(answer.json()) == min(100, args.studies), answer.text[:200]
                return elapsed

            def graphql(client: httpx.Client) -> float:
                t0 = time.perf_counter()
                answer = client.post("/graphql", json=GRAPHQL)
                elapsed = time.perf_counter() - t0
                assert answer.status_code == 200 and "results" in answer.text, answer.text[:200]
                return elapsed

            cases = {
                "QIDO-RS /studies?limit=100": (lambda: qido(direct_dicomweb, True), lambda: qido(through, False)),
                "Dagster GraphQL runsOrError": (lambda: graphql(direct_dagster), lambda: graphql(through)),
            }
            print(f"{'request':32} {'direct ms':>10} {'gateway ms':>11} {'ratio':>6} "
                  f"{'p90 direct':>11} {'p90 gateway':>12} {'ratio':>6}")
            for name, (direct, gated) in cases.items():
                for _ in range(5):  # warm-up: connections, caches
                    direct(), gated()
                direct_times, gateway_times = [], []
                for _ in range(args.repeats):  # alternating: both sides see the same load
                    direct_times.append(direct())
                    gateway_times.append(gated())
                d50, g50 = statistics.median(direct_times) * 1e3, statistics.median(gateway_times) * 1e3
                d90 = statistics.quantiles(direct_times, n=10)[-1] * 1e3
                g90 = statistics.quantiles(gateway_times, n=10)[-1] * 1e3
                print(f"{name:32} {d50:10.2f} {g50:11.2f} {g50 / d50:6.2f} {d90:11.2f} {g90:12.2f} {g90 / d90:6.2f}")
        finally:
            if gateway is not None:
                gateway.stop()
            webserver.stop()
            dicomweb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

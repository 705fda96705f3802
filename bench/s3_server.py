"""A real S3 API on loopback (moto's server, a process) for the tests, the benchmark and
`make s3-server` (the demo's lake on S3). moto ≥ 5.0.15 honours `If-None-Match: *` on
PutObject, the conditional write Delta commits rely on.

`python -m bench.s3_server [--port N]` serves until interrupted and prints the variables a
lake on it needs."""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kaapana_assets.federation.local import free_port
from kaapana_assets.federation.local import stop as stop_process
from kaapana_assets.lake import Lake

BUCKET = "kaapana"
# moto accepts any credentials; these only have to be present and consistent.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kaapana-test", "AWS_SECRET_ACCESS_KEY": "kaapana-test-secret"}
REGION = "us-east-1"


class S3Server:
    """`moto_server` on 127.0.0.1 at a free port, with one bucket; ended by its PID."""

    def __init__(self, port: int | None = None, bucket: str = BUCKET, log: Path | None = None):
        self.port, self.bucket = port or free_port(), bucket
        moto = Path(sys.executable).with_name("moto_server")
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on port {self.port}") from None
                time.sleep(0.05)
        self.client().create_bucket(Bucket=bucket)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self, endpoint: str | None = None) -> dict[str, str]:
        """deltalake storage options (what Environment.lake_storage_options gives a lake on it)."""
        return self.options_for(endpoint or self.endpoint)

    @staticmethod
    def options_for(endpoint: str) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true", **CREDENTIALS}

    def environment(self, prefix: str) -> dict[str, str]:
        """The variables of a lake at s3://<bucket>/<prefix> on this server."""
        return {"KAAPANA_LAKE_URI": f"s3://{self.bucket}/{prefix}", **self.options()}

    def lake(self, prefix: str | None = None, endpoint: str | None = None, unsafe_store_allowed: bool = False) -> Lake:
        """A lake under a fresh prefix (or the one given) of the bucket."""
        return Lake(f"s3://{self.bucket}/{prefix or uuid.uuid4().hex}", self.options(endpoint), unsafe_store_allowed)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        stop_process(self.proc, grace_s=10)


def _proxy_handler(upstream_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("if-none-match", "connection")}
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "server", "date") and \
                        not (key.lower() == "content-length" and self.command != "HEAD"):
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


class IgnoringConditionalWrites:
    """An S3 store that ignores conditional writes, as some do: a loopback HTTP proxy in front
    of `upstream` that drops the If-None-Match header of every request. A process of its own:
    deltalake holds the GIL while it waits for a reply, so a proxy thread beside it would stall."""

    def __init__(self, upstream: S3Server):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.s3_server", "--proxy-to", str(upstream.port),
                                      "--port", str(self.port)], start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/{upstream.bucket}?list-type=2", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the proxy did not start on port {self.port}") from None
                time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: moto's server (its own process group) ends with this process."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default=BUCKET)
    parser.add_argument("--proxy-to", type=int, metavar="PORT",
                        help="(tests) serve a proxy to the S3 API at PORT that drops If-None-Match")
    args = parser.parse_args()
    if args.proxy_to:
        ThreadingHTTPServer(("127.0.0.1", args.port), _proxy_handler(args.proxy_to)).serve_forever()
        return
    signal.signal(signal.SIGTERM, _interrupted)
    server = S3Server(args.port, args.bucket)
    print(f"S3 API on {server.endpoint}, bucket {args.bucket}. A lake on it:")
    for key, value in server.environment("lake").items():
        print(f"  export {key}={value}")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()

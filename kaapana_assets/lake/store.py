"""The object store under an s3:// lake: whether it honours conditional writes.

Delta commits on S3 are safe only where a put-if-absent of a log entry
(`PutObject` with `If-None-Match: *`) fails when the entry exists: deltalake then knows
that a concurrent writer took the version and retries against the new state. A store
that ignores the header overwrites the other writer's commit, silently. So before the
first write of a process the lake probes the store once and refuses to write where the
second put-if-absent of one key succeeds."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

# deltalake's storage option for put-if-absent commits through ETag preconditions:
# with it, S3 commits need no DynamoDB lock (object_store's AmazonS3ConfigKey::ConditionalPut).
CONDITIONAL_PUT = {"conditional_put": "etag"}
OPT_OUT = "KAAPANA_LAKE_UNSAFE_STORE=allow"
PROBE_FOLDER = "_kaapana_store_probe"


class UnsafeStoreError(RuntimeError):
    """The object store ignores conditional writes: concurrent commits would overwrite each other."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without a trailing slash; empty at the bucket's root

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parsed = urlparse(uri)
        if parsed.scheme not in ("s3", "s3a") or not parsed.netloc:
            raise ValueError(f"not an s3:// URI: {uri!r}")
        return cls(parsed.netloc, parsed.path.strip("/"))


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _client(options: dict[str, str]):
    import boto3  # only an s3:// lake needs it (≈0.3 s to import)
    from botocore.config import Config

    def option(*names: str) -> str | None:
        for name in names:
            for key in (name, name.lower()):
                if options.get(key):
                    return options[key]
        return None

    return boto3.client(
        "s3",
        endpoint_url=option("AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
        region_name=option("AWS_REGION", "AWS_DEFAULT_REGION"),
        aws_access_key_id=option("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=option("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=option("AWS_SESSION_TOKEN"),
        config=Config(retries={"max_attempts": 2}),
    )


def honours_conditional_writes(uri: str, options: dict[str, str]) -> bool:
    """Put one probe key twice with If-None-Match: *; True where the second put fails with
    412 Precondition Failed (or 409, a concurrent conditional write)."""
    from botocore.exceptions import ClientError

    location = S3Location.parse(uri)
    key = "/".join(p for p in (location.prefix, PROBE_FOLDER, uuid.uuid4().hex) if p)
    client = _client(options)
    client.put_object(Bucket=location.bucket, Key=key, Body=b"probe", IfNoneMatch="*")
    try:
        client.put_object(Bucket=location.bucket, Key=key, Body=b"probe", IfNoneMatch="*")
        honoured = False
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status not in (409, 412):
            raise
        honoured = True
    client.delete_object(Bucket=location.bucket, Key=key)
    return honoured


_checked: dict[tuple[str, str, str], bool] = {}
_lock = threading.Lock()


def check_store(uri: str, options: dict[str, str], unsafe_allowed: bool) -> None:
    """Refuse to write to a store without conditional writes, unless the operator opted out.
    Probed once per process and store (endpoint and bucket)."""
    endpoint = options.get("AWS_ENDPOINT_URL") or options.get("aws_endpoint_url") or ""
    location = S3Location.parse(uri)
    cache_key = (endpoint, location.bucket, location.prefix)
    with _lock:
        if cache_key not in _checked:
            _checked[cache_key] = honours_conditional_writes(uri, options)
        honoured = _checked[cache_key]
    if not honoured and not unsafe_allowed:
        where = f"{uri} at {endpoint}" if endpoint else uri
        raise UnsafeStoreError(
            f"the object store of {where} ignores conditional writes (a second PutObject with "
            f"If-None-Match: * succeeded): concurrent Delta commits would overwrite each other. "
            f"Use a store with conditional writes (MinIO, AWS S3), or set {OPT_OUT} to write anyway "
            f"with a single writer")

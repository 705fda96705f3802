"""What travels over Flower's channel between the hub and a site, and how each message is
authenticated end to end.

Every message (both directions) is a Flower `RecordDict` with the content records and one
ConfigRecord `manifest`: kind, experiment, round, site, case count, a sha256 over the
content (arrays: name, dtype, shape and bytes; metric and config records: canonical JSON),
a nonce, and an HMAC-SHA256 of the manifest with the site's own 256-bit key.

Why an HMAC on top of TLS and SuperNode authentication: TLS ends at the SuperLink, which
relays and stores messages; node authentication proves which SuperNode polled, not that
the bytes the ServerApp aggregates are the ones the site's training produced, nor which
round they were made for. The manifest binds content to site, experiment, round and kind,
so the hub rejects tampered, foreign and replayed updates, and a site verifies the global
weights it trains from. Confidentiality is TLS's job: the arrays stay readable so that
Flower's strategies and DP functions operate on them (the former AES-GCM envelopes hid
them, and the hub decrypts everything it aggregates anyway).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues

from kaapana_assets.federation.keys import validate_site_key

MANIFEST = "manifest"
ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
ALIASES = "aliases"  # ConfigRecord of a weights message: tensor name -> the name whose array it repeats
WEIGHT_KEY = "num-examples"  # the MetricRecord key Flower's strategies weight by
IDENTITY_EXPERIMENT = "federation"  # identity messages belong to no experiment


class Kind(StrEnum):
    """Message kinds; the first seven go hub → site, the rest come back."""

    IDENTIFY = "identify"
    FINGERPRINT_REQUEST = "fingerprint_request"
    TRAIN = "train"
    EVALUATE = "evaluate"
    STATISTICS_REQUEST = "statistics_request"  # the network monitor asks for a site's aggregates
    MODEL_EVALUATION_REQUEST = "model_evaluation_request"  # evaluate a model on the site's held-out cohort
    BASELINE_REQUEST = "baseline_request"  # train a local-only baseline (cross-site evaluation), if consented
    IDENTITY = "identity"
    FINGERPRINT = "fingerprint"
    UPDATE = "update"
    EVALUATION = "evaluation"
    STATISTICS = "statistics"  # a site's aggregates, small cells suppressed
    MODEL_EVALUATION = "model_evaluation"  # a model's metrics at a site, aggregates only, small cells suppressed
    BASELINE = "baseline"  # a consenting site's local-only model (or its refusal)


class RejectionReason(StrEnum):
    """Why a site's message was not used (the rounds table's `reason`)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    WRONG_SITE = "wrong_site"
    REPLAYED = "replayed"
    UNAUTHENTIC = "unauthentic"  # the HMAC fails: tampered, or another site's key
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_PAYLOAD = "bad_payload"
    SITE_FAILED = "site_failed"
    REFUSED = "refused"  # the site declined the request (an evaluation on a cohort not held out from the model)


class UpdateRejected(ValueError):
    def __init__(self, reason: RejectionReason, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def message_type(kind: Kind) -> str:
    """The Flower message type a request of `kind` travels as (the ClientApp refuses a
    request that comes as another)."""
    return {Kind.TRAIN: MessageType.TRAIN, Kind.EVALUATE: MessageType.EVALUATE}.get(kind, MessageType.QUERY)


@dataclass
class Rejection:
    """A site whose reply the hub did not use, and why."""

    site: str
    reason: RejectionReason
    message: str

    def to_json(self) -> dict:
        return {"site": self.site, "reason": str(self.reason), "message": self.message}


@dataclass
class Verified:
    """A site's message that passed verification."""

    site: str
    cases: int
    metrics: dict[str, float]
    sha256: str  # the content digest the site signed
    message: Message | None = None  # the Flower message (updates: what the strategy aggregates)


@dataclass(frozen=True)
class Manifest:
    kind: str
    experiment: str
    round: int
    site: str
    cases: int
    sha256: str
    nonce: str
    created_at: str

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def _mac(manifest: Manifest, key: str) -> str:
    return hmac.new(base64.b64decode(key), manifest.canonical(), hashlib.sha256).hexdigest()


def content_bytes(content: RecordDict) -> bytes:
    """Canonical bytes of everything but the manifest: what the digest covers, what the
    identifier guard scans and what the hub keeps of each message it received."""
    parts: list[bytes] = []
    for name in sorted(content.keys()):
        if name == MANIFEST:
            continue
        record = content[name]
        parts.append(name.encode() + b"\0")
        if isinstance(record, ArrayRecord):
            for key in record.keys():  # insertion order: the network's own order
                array = record[key]
                parts.append(json.dumps([key, array.dtype, list(array.shape)]).encode() + b"\0")
                parts.append(array.data)
        else:
            parts.append(json.dumps(dict(record), sort_keys=True, default=str).encode())
    return b"\0".join(parts)


def seal(content: RecordDict, kind: Kind, experiment: str, round_: int, site: str, cases: int, key: str,
         nonce: str | None = None) -> RecordDict:
    """Add the signed manifest to `content` (in place) and return it."""
    manifest = Manifest(str(kind), experiment, int(round_), site, int(cases),
                        hashlib.sha256(content_bytes(content)).hexdigest(),
                        nonce or base64.b64encode(os.urandom(12)).decode(), dt.datetime.now(dt.timezone.utc).isoformat())
    content[MANIFEST] = ConfigRecord({**asdict(manifest), "hmac": _mac(manifest, validate_site_key(key, site))})
    return content


def read_manifest(content: RecordDict) -> tuple[Manifest, str]:
    try:
        record = dict(content[MANIFEST])
        mac = str(record.pop("hmac"))
        return Manifest(**record), mac  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateRejected(RejectionReason.MALFORMED, f"no readable manifest: {exc}") from None


def verify(content: RecordDict, key: str, kind: Kind, experiment: str, round_: int, site: str) -> Manifest:
    """The manifest of a message from (or for) `site`, or UpdateRejected with the reason."""
    manifest, mac = read_manifest(content)
    if manifest.site != site:
        raise UpdateRejected(RejectionReason.WRONG_SITE, f"message claims site {manifest.site!r}, expected {site!r}")
    if not hmac.compare_digest(_mac(manifest, validate_site_key(key, site)), mac):
        raise UpdateRejected(RejectionReason.UNAUTHENTIC,
                             f"message of {site} failed authentication: tampered, or not signed with {site}'s key")
    if (manifest.kind, manifest.experiment, manifest.round) != (str(kind), experiment, int(round_)):
        raise UpdateRejected(RejectionReason.REPLAYED, f"message is a {manifest.kind} of {manifest.experiment} round "
                             f"{manifest.round}, expected a {kind} of {experiment} round {round_}")
    if hashlib.sha256(content_bytes(content)).hexdigest() != manifest.sha256:
        raise UpdateRejected(RejectionReason.DIGEST_MISMATCH,
                             f"content of {site}'s {kind} does not match its signed digest: altered after signing")
    return manifest


# -- conversions -------------------------------------------------------------------------------

def to_arrays(weights: Mapping[str, torch.Tensor]) -> ArrayRecord:
    # nnU-Net state dicts alias tensors (decoder.encoder.* is encoder.*): each key gets its own copy.
    return ArrayRecord({name: Array(t.detach().cpu().contiguous().numpy().copy()) for name, t in weights.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(record[name].numpy(), copy=True)) for name in record.keys()}


def repeats(weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor repeats an earlier one's (same dtype, shape and bytes) → that name.

    nnU-Net's state dict names most tensors four times (decoder.encoder.* is encoder.*, and
    conv/norm are all_modules.0/1). Found by value: a site's update comes back from
    safetensors, where the sharing is gone."""
    out: dict[str, str] = {}
    first: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    for name, tensor in weights.items():
        raw = np.ascontiguousarray(tensor.detach().cpu().numpy()).reshape(-1).view(np.uint8)
        fingerprint = (str(tensor.dtype), tuple(tensor.shape), hashlib.blake2b(raw.data, digest_size=16).digest())
        earlier = first.get(fingerprint)
        if earlier is not None and torch.equal(weights[earlier], tensor):
            out[name] = earlier
        else:
            first.setdefault(fingerprint, name)
    return out


def weight_records(weights: Mapping[str, torch.Tensor]) -> dict[str, ArrayRecord | ConfigRecord]:
    """The weights as the records of a message, each distinct array sent once (240 names,
    88 arrays, 71 MB → 22 MB for the demo's network); `full_arrays` restores every name, so
    the receiver sees exactly the state dict that was sent. The alias map is content: the
    digest covers it."""
    aliases = repeats(weights)
    arrays = {name: Array(np.ascontiguousarray(t.detach().cpu().numpy()).copy())
              for name, t in weights.items() if name not in aliases}
    return {ARRAYS: ArrayRecord(arrays), ALIASES: ConfigRecord(cast(dict[str, ConfigRecordValues], aliases))}


def full_arrays(content: RecordDict) -> ArrayRecord:
    """The message's arrays under every name of the state dict (repeats share one Array).
    ValueError for an alias map that does not fit the arrays."""
    record = content.array_records[ARRAYS]
    aliases = {str(k): str(v) for k, v in content.config_records[ALIASES].items()} if ALIASES in content else {}
    if not aliases:
        return record
    clash = sorted(set(aliases) & set(record.keys()))
    dangling = sorted(v for v in aliases.values() if v not in record)
    if clash or dangling:
        raise ValueError(f"alias map does not fit the arrays: {(clash or dangling)[0]!r}")
    return ArrayRecord({**{k: record[k] for k in record.keys()}, **{k: record[v] for k, v in aliases.items()}})


def weights_of(content: RecordDict) -> dict[str, torch.Tensor]:
    """The state dict a weights message carries; every name its own tensor."""
    return from_arrays(full_arrays(content))


def metric_name(label: str) -> str:
    """The metric a site reports for a label's Dice (an MLflow-safe name)."""
    return "dice_" + (re.sub(r"[^a-z0-9_]+", "_", label.lower()).strip("_") or "label")


def metrics_record(cases: int, metrics: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({WEIGHT_KEY: int(cases), **{k: float(v) for k, v in metrics.items()}})


def metrics_of(content: RecordDict) -> tuple[int, dict[str, float]]:
    record = dict(content.metric_records[METRICS])
    cases = int(cast(float, record.pop(WEIGHT_KEY)))
    return cases, {k: float(cast(float, v)) for k, v in record.items()}

"""What a site may send: tensors, a case count and numeric metrics — nothing else.

Payloads are safetensors (no pickle: a hub must never execute what a site sends) with
string metadata holding only the count and the metrics, validated on both ends."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

METRIC_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")
ALLOWED_METADATA = {"kaapana.cases", "kaapana.metrics"}


class PayloadError(ValueError):
    pass


@dataclass
class SiteUpdate:
    site: str
    cases: int
    weights: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    clean = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not METRIC_NAME.fullmatch(name):
            raise PayloadError(f"metric name {str(name)[:40]!r} is not allowed (lowercase identifiers only)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PayloadError(f"metric {name} must be a number, not {type(value).__name__}")
        clean[name] = float(value)
    return clean


def pack_update(weights: dict[str, torch.Tensor], cases: int, metrics: dict[str, float]) -> bytes:
    if not isinstance(cases, int) or cases < 1:
        raise PayloadError(f"case count must be a positive integer, not {cases!r}")
    # nnU-Net state dicts alias tensors (decoder.encoder.* is encoder.*); safetensors refuses
    # shared storage, and per-key averaging is right for the copies too.
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in weights.items()}
    metadata = {"kaapana.cases": str(cases), "kaapana.metrics": json.dumps(_check_metrics(metrics), sort_keys=True)}
    return save_tensors(tensors, metadata=metadata)


def unpack_update(site: str, payload: bytes) -> SiteUpdate:
    try:
        weights = load_tensors(payload)
        header_len = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_len]).get("__metadata__", {})
    except Exception as exc:  # noqa: BLE001 - hostile bytes
        raise PayloadError(f"not a safetensors payload: {exc}") from None
    if set(metadata) - ALLOWED_METADATA:
        raise PayloadError(f"unexpected metadata {sorted(set(metadata) - ALLOWED_METADATA)}")
    try:
        cases = int(metadata["kaapana.cases"])
        metrics = _check_metrics(json.loads(metadata["kaapana.metrics"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise PayloadError(f"bad metadata: {exc}") from None
    if cases < 1:
        raise PayloadError("case count must be positive")
    return SiteUpdate(site, cases, weights, metrics)

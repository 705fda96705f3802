"""Aggregating site updates: FedAvg weighted by case count, or a coordinate-wise median;
and the quorum a round needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kaapana_assets.federated.payload import SiteUpdate


class QuorumNotMet(RuntimeError):
    pass


def require_quorum(updates: Sequence[SiteUpdate], expected: Sequence[str], min_sites: int) -> None:
    missing = sorted(set(expected) - {u.site for u in updates})
    if len(updates) < min_sites:
        raise QuorumNotMet(
            f"{len(updates)} of {len(expected)} site updates arrived, {min_sites} needed "
            f"(missing: {', '.join(missing) or 'none'}); nothing aggregated — re-materialize the round to retry"
        )


def _check_keys(updates: Sequence[SiteUpdate]) -> list[str]:
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = list(updates[0].weights)
    for u in updates[1:]:
        if set(u.weights) != set(keys):
            raise ValueError(f"site {u.site} sent a different network ({len(u.weights)} tensors, expected {len(keys)})")
        for k in keys:
            if u.weights[k].shape != updates[0].weights[k].shape:
                raise ValueError(f"site {u.site}: tensor {k} has shape {tuple(u.weights[k].shape)}")
    return keys


def fedavg(updates: Sequence[SiteUpdate]) -> dict[str, torch.Tensor]:
    """Per-key average weighted by case count (float64 accumulation). Integer tensors
    (counters) are taken from the site with the most cases."""
    keys = _check_keys(updates)
    total = sum(u.cases for u in updates)
    largest = max(updates, key=lambda u: u.cases)
    out = {}
    for k in keys:
        reference = updates[0].weights[k]
        if not reference.is_floating_point():
            out[k] = largest.weights[k].clone()
            continue
        acc = torch.zeros_like(reference, dtype=torch.float64)
        for u in updates:
            acc += u.weights[k].to(torch.float64) * (u.cases / total)
        out[k] = acc.to(reference.dtype)
    return out


def coordinate_median(updates: Sequence[SiteUpdate]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median: robust to one site sending a wild update."""
    keys = _check_keys(updates)
    out = {}
    for k in keys:
        stacked = torch.stack([u.weights[k] for u in updates])
        # torch.median returns the lower middle value: with two sites, an element-wise minimum.
        # Average the two middle values, as np.median does (torch.quantile caps tensor size).
        if stacked.is_floating_point():
            ordered = stacked.double().sort(dim=0).values
            n = ordered.shape[0]
            out[k] = ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).to(stacked.dtype)
        else:
            out[k] = updates[0].weights[k].clone()
    return out


STRATEGIES = {"fedavg": fedavg, "median": coordinate_median}

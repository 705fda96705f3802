"""Aggregating verified site updates with Flower's strategies, and the quorum a round needs.

The strategy's `aggregate_train` does the arithmetic (weighted by the `num-examples` the
site reported, as Flower's strategies expect); quorum, verification and what happens to
a round below quorum stay ours (see hub.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from kaapana_assets.federated.channel import WEIGHT_KEY, from_arrays

# fedprox aggregates like FedAvg; its proximal term is in each site's local training
# (Schedule.proximal_mu), which Flower's FedProx only sends as a config value.
STRATEGIES = ("fedavg", "fedprox", "median", "trimmed_mean")


class QuorumNotMet(RuntimeError):
    pass


def require_quorum(sites: Sequence[str], expected: Sequence[str], min_sites: int) -> None:
    missing = sorted(set(expected) - set(sites))
    if len(sites) < min_sites:
        raise QuorumNotMet(
            f"{len(sites)} of {len(expected)} site updates arrived, {min_sites} needed "
            f"(missing: {', '.join(missing) or 'none'}); nothing aggregated — re-materialize the round to retry"
        )


def flower_strategy(name: str, proximal_mu: float = 0.0, trim_beta: float = 0.2) -> Strategy:
    if name == "fedavg":
        return FedAvg(weighted_by_key=WEIGHT_KEY)
    if name == "fedprox":
        return FedProx(weighted_by_key=WEIGHT_KEY, proximal_mu=proximal_mu)
    if name == "median":
        return FedMedian(weighted_by_key=WEIGHT_KEY)
    if name == "trimmed_mean":
        return FedTrimmedAvg(weighted_by_key=WEIGHT_KEY, beta=trim_beta)
    raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")


def aggregate(replies: Sequence[Message], round_: int, strategy: str, proximal_mu: float = 0.0,
              reference: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The strategy's aggregate of verified update replies, as a state dict (dtypes of
    `reference`, the global model the round started from, when given)."""
    if not replies:
        raise ValueError("no updates to aggregate")
    arrays, _ = flower_strategy(strategy, proximal_mu).aggregate_train(round_, list(replies))
    if arrays is None:
        raise ValueError(f"{strategy} aggregated nothing: the replies are inconsistent (see the log)")
    weights = from_arrays(arrays)
    if reference is not None:
        missing = set(reference) - set(weights)
        if missing:
            raise ValueError(f"the aggregate lacks {len(missing)} tensor(s) of the network, e.g. {sorted(missing)[0]}")
        weights = {k: weights[k].to(reference[k].dtype) for k in reference}
    return weights

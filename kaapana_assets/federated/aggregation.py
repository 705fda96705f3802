"""Aggregating verified site updates with Flower's strategies, and the quorum a round needs.

The strategy's `aggregate_train` does the arithmetic (weighted by the `num-examples` the
site reported, as Flower's strategies expect); quorum, verification and what happens to
a round below quorum stay ours (see hub.py).

Each round is its own Flower run, so a strategy object lives for one round. FedAvgM's one
piece of state, the server momentum, is therefore handed in and returned (the hub keeps
it beside the global model of the round)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from kaapana_assets.federated.strategy import Strategy
from kaapana_assets.federation.channel import ARRAYS, WEIGHT_KEY, from_arrays


class QuorumNotMet(RuntimeError):
    pass


def require_quorum(sites: Sequence[str], expected: Sequence[str], min_sites: int) -> None:
    missing = sorted(set(expected) - set(sites))
    if len(sites) < min_sites:
        raise QuorumNotMet(
            f"{len(sites)} of {len(expected)} site updates arrived, {min_sites} needed "
            f"(missing: {', '.join(missing) or 'none'}); nothing aggregated — re-materialize the round to retry"
        )


def flower_strategy(strategy: Strategy, proximal_mu: float = 0.0, trim_beta: float = 0.2,
                    server_momentum: float = 0.0) -> FlowerStrategy:
    match strategy:
        case Strategy.FEDAVG:
            return FedAvg(weighted_by_key=WEIGHT_KEY)
        case Strategy.FEDAVGM:
            return FedAvgM(weighted_by_key=WEIGHT_KEY, server_momentum=server_momentum)
        case Strategy.FEDPROX:
            return FedProx(weighted_by_key=WEIGHT_KEY, proximal_mu=proximal_mu)
        case Strategy.MEDIAN:
            return FedMedian(weighted_by_key=WEIGHT_KEY)
        case Strategy.TRIMMED_MEAN:
            return FedTrimmedAvg(weighted_by_key=WEIGHT_KEY, beta=trim_beta)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(Strategy)}")


@dataclass
class Aggregate:
    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None  # FedAvgM's server momentum after this round


def aggregate(replies: Sequence[Message], round_: int, strategy: Strategy, proximal_mu: float = 0.0,
              reference: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The strategy's aggregate of verified update replies, as a state dict (dtypes of
    `reference`, the global model the round started from, when given)."""
    return aggregate_round(replies, round_, strategy, proximal_mu, reference).weights


def aggregate_round(replies: Sequence[Message], round_: int, strategy: Strategy, proximal_mu: float = 0.0,
                    reference: dict[str, torch.Tensor] | None = None, server_momentum: float = 0.0,
                    momentum: dict[str, torch.Tensor] | None = None) -> Aggregate:
    """`aggregate`, and for FedAvgM the server momentum carried from round to round: it needs
    `reference` (the global model the sites started from) and takes the previous round's
    `momentum` (None in the first round)."""
    if not replies:
        raise ValueError("no updates to aggregate")
    flower = flower_strategy(strategy, proximal_mu, server_momentum=server_momentum)
    names: list[str] = []
    if isinstance(flower, FedAvgM):
        names = list(replies[0].content[ARRAYS].keys())  # FedAvgM pairs arrays by position
        if reference is None:
            raise ValueError("fedavgm needs the global model the round started from")
        if server_momentum <= 0:
            raise ValueError("fedavgm needs a server momentum above 0 (0 is fedavg)")
        flower.current_arrays = ArrayRecord({k: Array(reference[k].detach().cpu().numpy()) for k in names})
        if momentum is not None:
            if set(momentum) != set(names):
                raise ValueError("the stored server momentum does not fit the network's tensors")
            flower.momentum_vector = [momentum[k].numpy() for k in names]
    arrays, _ = flower.aggregate_train(round_, list(replies))
    if arrays is None:
        raise ValueError(f"{strategy} aggregated nothing: the replies are inconsistent (see the log)")
    weights = from_arrays(arrays)
    if reference is not None:
        missing = set(reference) - set(weights)
        if missing:
            raise ValueError(f"the aggregate lacks {len(missing)} tensor(s) of the network, e.g. {sorted(missing)[0]}")
        weights = {k: weights[k].to(reference[k].dtype) for k in reference}
    if isinstance(flower, FedAvgM) and flower.momentum_vector is not None:
        return Aggregate(weights, {k: torch.from_numpy(np.array(v, copy=True))
                                   for k, v in zip(names, flower.momentum_vector, strict=True)})
    return Aggregate(weights)

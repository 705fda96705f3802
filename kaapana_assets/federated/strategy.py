"""The Flower strategies a federation aggregates with. Light on purpose: the code location
and the resources read it without loading torch or Flower."""

from __future__ import annotations

from enum import StrEnum


class Strategy(StrEnum):
    """FederationResource.strategy, an experiment's spec, `bench/federated.py --strategy`."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"  # FedAvg with the hub's momentum over rounds
    # Aggregates like FedAvg; its proximal term is in each site's local training
    # (Schedule.proximal_mu), which Flower's FedProx only sends as a config value.
    FEDPROX = "fedprox"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"

    @classmethod
    def parse(cls, value: str) -> Strategy:
        """The strategy a configured or published name means; a clear error listing the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown strategy {value!r}; one of {', '.join(cls)}") from None

"""Federated partitions: one per experiment; rounds are experiment × round number."""

import dagster as dg

MAX_ROUNDS = 20

experiments_partitions = dg.DynamicPartitionsDefinition(name="federated_experiments")
# Keys read "experiment|round" (dimensions in name order), e.g. "liver-fed|3".
rounds_partitions = dg.MultiPartitionsDefinition({
    "experiment": experiments_partitions,
    "round": dg.StaticPartitionsDefinition([str(r) for r in range(1, MAX_ROUNDS + 1)]),
})


def round_key(experiment: str, round_: int) -> str:
    return f"{experiment}|{round_}"

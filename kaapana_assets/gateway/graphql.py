"""What a Dagster GraphQL request would do, read from its parsed document (graphql-core, which
Dagster brings): whether it mutates, and which runs it would launch (job or assets, partitions,
tags), for the gateway to allow or refuse by role and project before the webserver sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    parse,
    value_from_ast_untyped,
)

# Dagster's mutations that launch runs (dagster-graphql's schema): their run's partitions and
# tags are read from the arguments.
LAUNCHES = frozenset({"launchRun", "launchPipelineExecution", "launchMultipleRuns", "launchPartitionBackfill",
                      "launchRunReexecution", "launchPipelineReexecution"})
PARTITION_TAG = "dagster/partition"


class GraphQLRequestError(ValueError):
    """A document that does not parse, or names an operation it does not hold (400)."""


@dataclass(frozen=True)
class Launch:
    mutation: str  # the mutation's field name
    job: str | None  # the job or pipeline name of its selector
    asset_roots: frozenset[str]  # the first part of each selected asset key
    partitions: frozenset[str]  # the partition keys it runs
    tags: Mapping[str, str]


@dataclass(frozen=True)
class Operation:
    kind: OperationType
    fields: tuple[str, ...]  # its top-level fields
    launches: tuple[Launch, ...]

    @property
    def mutates(self) -> bool:
        return self.kind is OperationType.MUTATION

    @property
    def launches_only(self) -> bool:
        return all(name in LAUNCHES for name in self.fields)


def _selected(document: DocumentNode, operation_name: str | None) -> OperationDefinitionNode:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation_name:
        chosen = [o for o in operations if o.name is not None and o.name.value == operation_name]
        if not chosen:
            raise GraphQLRequestError(f"no operation named {operation_name!r} in the document")
        return chosen[0]
    if len(operations) != 1:
        raise GraphQLRequestError(f"the document holds {len(operations)} operations and names none to run")
    return operations[0]


def _tags(value: Any) -> dict[str, str]:
    if not isinstance(value, list):
        return {}
    return {str(t["key"]): str(t["value"]) for t in value if isinstance(t, Mapping) and "key" in t and "value" in t}


def _launches(field: FieldNode, variables: Mapping[str, Any]) -> list[Launch]:
    args = {a.name.value: value_from_ast_untyped(a.value, dict(variables)) for a in field.arguments or ()}
    params: list[Mapping[str, Any]] = []
    for name in ("executionParams", "backfillParams", "reexecutionParams"):
        if isinstance(args.get(name), Mapping):
            params.append(args[name])
    if isinstance(args.get("executionParamsList"), list):
        params += [p for p in args["executionParamsList"] if isinstance(p, Mapping)]
    found = []
    for p in params:
        selector = p.get("selector") or {}
        metadata = p.get("executionMetadata") or {}
        tags = _tags(metadata.get("tags")) | _tags(p.get("tags"))
        partitions = set(p.get("partitionNames") or [])
        if PARTITION_TAG in tags:
            partitions.add(tags[PARTITION_TAG])
        asset_keys = list(selector.get("assetSelection") or []) + list(p.get("assetSelection") or [])
        roots = {str(k["path"][0]) for k in asset_keys if isinstance(k, Mapping) and k.get("path")}
        job = selector.get("jobName") or selector.get("pipelineName")
        found.append(Launch(field.name.value, str(job) if job else None, frozenset(roots),
                            frozenset(map(str, partitions)), tags))
    if not found:  # a launch whose parameters are not where this module looks: nothing to allow it by
        found.append(Launch(field.name.value, None, frozenset(), frozenset(), {}))
    return found


def operation(query: str, operation_name: str | None = None, variables: Mapping[str, Any] | None = None) -> Operation:
    """The operation a GraphQL request would run (fragments are not followed: a mutation's
    top-level fields are written out in the operation itself)."""
    try:
        document = parse(query)
    except GraphQLError as exc:
        raise GraphQLRequestError(f"the GraphQL document does not parse: {exc.message}") from None
    chosen = _selected(document, operation_name)
    fields = [s for s in chosen.selection_set.selections if isinstance(s, FieldNode)]
    if len(fields) != len(chosen.selection_set.selections) and chosen.operation is OperationType.MUTATION:
        raise GraphQLRequestError("a mutation's fields are written out, not spread from fragments")
    launches = [launch for f in fields if f.name.value in LAUNCHES for launch in _launches(f, variables or {})]
    return Operation(chosen.operation, tuple(f.name.value for f in fields), tuple(launches))

"""The GraphQL documents the gateway reads (graphql-core's parser, not patterns) and what each
role may send, without any server."""

from __future__ import annotations

import pytest

from kaapana_assets.access.identity import Identity, Role
from kaapana_assets.gateway.graphql import GraphQLRequestError, operation
from kaapana_assets.gateway.policy import CohortProjects, decide
from tests.oidc import COHORT_A, COHORT_B, PROJECT_A, PROJECT_B, cohort_yaml

MANAGER = Identity("pia", frozenset({Role.PROJECT_MANAGER}), frozenset({PROJECT_A}))
SCIENTIST = Identity("sam", frozenset({Role.SCIENTIST}), frozenset({PROJECT_A}))
VIEWER = Identity("vic", frozenset({Role.VIEWER}), frozenset({PROJECT_A}))
EVALUATION = frozenset({"evaluation"})
PROJECTS = {COHORT_A: PROJECT_A, COHORT_B: PROJECT_B}.get
BACKFILL = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename } }"""


def test_a_mutation_is_found_however_the_document_is_written() -> None:
    # A comment, an alias, a query named first and the mutation chosen by operationName.
    document = """# mutation? no: a comment
      query Runs { runsOrError { __typename } }
      mutation Wipe { ok: wipeAssets(assetPartitionRanges: []) { __typename } }"""
    assert not operation(document, "Runs").mutates
    wipe = operation(document, "Wipe")
    assert wipe.mutates and wipe.fields == ("wipeAssets",) and not wipe.launches_only
    assert not operation('{ pipelineOrError(params: {pipelineName: "mutation"}) { __typename } }').mutates
    for bad, message in (("mutation {", "does not parse"), (document, "2 operations"),
                         ("mutation M { ...F } fragment F on Mutation { wipeAssets { __typename } }", "fragments")):
        with pytest.raises(GraphQLRequestError, match=message):
            operation(bad, "M" if "fragment" in bad else None)


def test_launches_carry_their_partitions_from_tags_inline_or_variables() -> None:
    inline = operation("""mutation { launchRun(executionParams: {selector: {jobName: "cohort_job"},
        executionMetadata: {tags: [{key: "dagster/partition", value: "cohort-a"}]}}) { __typename } }""")
    [launch] = inline.launches
    assert (launch.job, launch.partitions) == ("cohort_job", frozenset({COHORT_A}))
    backfill = operation(BACKFILL, variables={"p": {"partitionNames": [COHORT_A, COHORT_B],
                                                     "assetSelection": [{"path": ["evaluation", "x"]}]}})
    assert backfill.launches[0].partitions == {COHORT_A, COHORT_B}
    assert backfill.launches[0].asset_roots == {"evaluation"}


def test_what_each_role_may_send() -> None:
    def launch(partitions: list[str], roots: tuple[str, ...] = ("cohort_snapshot",)):  # type: ignore[no-untyped-def]
        return operation(BACKFILL, variables={"p": {"partitionNames": partitions,
                                                     "assetSelection": [{"path": [r]} for r in roots]}})

    assert decide(VIEWER, operation("{ version }"), PROJECTS, EVALUATION).allowed
    assert not decide(VIEWER, launch([COHORT_A]), PROJECTS, EVALUATION).allowed
    assert decide(MANAGER, launch([COHORT_A]), PROJECTS, EVALUATION).allowed
    for refused in ([COHORT_B], [COHORT_A, COHORT_B], [], ["no-such-cohort"]):
        assert not decide(MANAGER, launch(refused), PROJECTS, EVALUATION).allowed, refused
    assert decide(SCIENTIST, launch([COHORT_A], ("evaluation",)), PROJECTS, EVALUATION).allowed
    assert not decide(SCIENTIST, launch([COHORT_A]), PROJECTS, EVALUATION).allowed
    terminate = operation('mutation { terminateRun(runId: "x") { __typename } }')
    assert not decide(MANAGER, terminate, PROJECTS, EVALUATION).allowed
    assert decide(Identity("ada", frozenset({Role.ADMIN}), frozenset()), terminate, PROJECTS, EVALUATION).allowed


def test_a_cohorts_project_is_its_definitions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.yaml").write_text(cohort_yaml(COHORT_A, PROJECT_A))
    (tmp_path / "plain.yaml").write_text("name: plain\npurpose: test\nfilter: {modality: CT}\n")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    projects = CohortProjects(tmp_path)
    assert (projects(COHORT_A), projects("plain"), projects("absent")) == (PROJECT_A, "admin", None)

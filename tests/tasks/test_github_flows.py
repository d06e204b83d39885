"""The real flows leave their statuses and deployments on the local GitHub server.

`ci` runs on the pinned repository (a bare remote: the approval policy's, main holding
it) with nothing to check, on main and as a pull request; `promote` moves releases of
`course` from gh-dev to gh-stg twice, and `rollback` returns gh-stg to the first; into
gh-prd, behind a gate, one promotion is approved and one rejected. Own environments
(gh-dev -> gh-stg -> gh-prd, host ports 47xxx), engine and registry of the stack.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from pydantic import SecretStr

from blocks.config import PipelineConfig, load_config
from blocks.github import GITHUB_BLOCK, GitHubRepository
from blocks.stack import StackInfo
from core.records import ImageRef
from flows.ci import ci
from flows.promotion import promote, rollback
from tasks.approval import submit_answer
from tasks.deploy.docker import DockerDeployer
from tasks.github.statuses import SUMMARY_MARKER
from tests.approvers import Approvers, paused_promotion
from tests.flows.chain import (
    derive,
    put_release,
    put_verified,
    remove_containers,
    write_chain_config,
)
from tests.plugins.github import GitHubServer, github_server
from tests.tasks.ci_checkout import push_commit
from tests.trust import pin_repository

pytestmark = pytest.mark.stack

DEV, STG, PRD = "gh-dev", "gh-stg", "gh-prd"
GATE = {PRD: {"approvers": ["bob", "carol"], "approvals_required": 1, "timeout_s": 120}}
SERVICE = "course"


@dataclass(frozen=True)
class Setup:
    cfg: PipelineConfig
    cfg_path: str
    people: Approvers
    server: GitHubServer
    images: tuple[ImageRef, ImageRef, ImageRef]


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
) -> Iterator[Setup]:
    """The pinned repository, gh-stg serving D1 from main's tip, GitHub's block saved."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", stack.docker_host)
    folder = tmp_path_factory.mktemp("github-flows")
    cfg_path = write_chain_config(
        folder / "pipeline.yaml",
        [(DEV, 26600), (STG, 26100), (PRD, 39300)],
        services=[(SERVICE, 8004)],
    )
    people = Approvers(folder, ["alice", "bob", "carol"])
    people.set_policy(GATE)  # gh-stg without a gate, gh-prd behind one
    pin_repository(mp, folder, people.bare, environments=(DEV, STG, PRD))
    cfg = load_config(cfg_path)
    remove_containers(docker_client, [DEV, STG, PRD])
    put_verified(cfg, STG, SERVICE, pushed_image)
    images = (
        pushed_image,
        derive(docker_client, pushed_image, "gh-two"),
        derive(docker_client, pushed_image, "gh-three"),
    )
    with github_server() as server:
        GitHubRepository(
            repository=server.repository,
            token=SecretStr(server.token),
            api_url=server.url,
            retry_backoff_s=0.05,
        ).save(GITHUB_BLOCK, overwrite=True)
        yield Setup(cfg, cfg_path, people, server, images)
        GitHubRepository.delete(GITHUB_BLOCK)
    remove_containers(docker_client, [DEV, STG, PRD])
    mp.undo()


def _in_dev(s: Setup, image: ImageRef, name: str) -> str:
    """What CI does for gh-dev on a new commit of main: the commit."""
    commit = push_commit(s.people.work, f"{name}.txt", f"{name}\n")
    put_release(
        DockerDeployer(), s.cfg, DEV, SERVICE, image, release_id=f"ci-{name}", commit=commit
    )
    return commit


def test_ci_on_main_and_on_a_pull_request_set_the_required_statuses(setup: Setup) -> None:
    server = setup.server
    head = push_commit(setup.people.work, "notes.txt", "no service changes\n")
    state = ci(base=head, head=head, ref="refs/heads/main", return_state=True)
    assert state.is_completed(), state.message
    latest = {s["context"]: s for s in server.statuses_for(head)}
    assert set(latest) == {"elice/checks", "elice/tests"}
    assert {s["state"] for s in latest.values()} == {"success"}
    assert str(state.state_details.flow_run_id) in latest["elice/checks"]["target_url"]

    server.open_pull(5, head)
    for _ in range(2):  # a second push to the pull request edits the one comment
        state = ci(base=head, head=head, ref="refs/pull/5/merge", return_state=True)
        assert state.is_completed(), state.message
    (comment,) = server.comments(5)
    assert comment["body"].startswith(SUMMARY_MARKER)
    assert "nothing to do" in comment["body"]


def test_ci_that_cannot_check_its_commit_marks_the_required_statuses_error(
    setup: Setup,
) -> None:
    missing = "f" * 40
    state = ci(base=missing, head=missing, ref="refs/heads/main", return_state=True)
    assert state.is_failed()
    latest = {s["context"]: s for s in setup.server.statuses_for(missing)}
    assert {s["state"] for s in latest.values()} == {"error"}
    assert set(latest) == {"elice/checks", "elice/tests"}


def test_promotions_then_a_rollback_leave_their_deployments(setup: Setup) -> None:
    server = setup.server
    _, d2, d3 = setup.images
    first_commit = _in_dev(setup, d2, "two")
    state = promote(
        environment=STG, config_source=setup.cfg_path, promoted_by="alice", return_state=True
    )
    assert state.is_completed(), state.message
    (first,) = server.deployments(STG)
    assert first["sha"] == first_commit
    assert first["payload"]["services"][SERVICE]["digest"] == d2.digest
    statuses = server.deployment_statuses(first["id"])
    assert [s["state"] for s in statuses] == ["in_progress", "success"]
    assert "promoted by alice" in statuses[-1]["description"]
    assert str(state.state_details.flow_run_id) in statuses[-1]["log_url"]

    second_commit = _in_dev(setup, d3, "three")
    state = promote(
        environment=STG, config_source=setup.cfg_path, promoted_by="alice", return_state=True
    )
    assert state.is_completed(), state.message
    _, second = server.deployments(STG)
    assert second["sha"] == second_commit
    assert server.deployment_states(second["id"]) == ["in_progress", "success"]
    assert server.deployment_states(first["id"])[-1] == "inactive"

    state = rollback(
        environment=STG, requested_by="bob", config_source=setup.cfg_path, return_state=True
    )
    assert state.is_completed(), state.message
    _, _, restored = server.deployments(STG)
    assert server.deployment_statuses(second["id"])[-1]["description"] == "rolled back by bob"
    assert restored["sha"] == first_commit
    assert restored["task"] == "deploy:rollback"
    assert server.deployment_states(restored["id"]) == ["in_progress", "success"]


def _gated(s: Setup, answer_as: str, decision: str = "approve") -> Any:
    """A promotion into gh-prd requested by alice, answered at its gate; its final state."""
    before = {r.id for r in _promote_runs()}
    states: queue.Queue[Any] = queue.Queue()
    params = s.people.request(PRD, "alice")
    thread = threading.Thread(
        target=lambda: states.put(
            promote(
                environment=PRD,
                config_source=s.cfg_path,
                health_deadline_s=20,
                return_state=True,
                **params,
            )
        ),
        daemon=True,
    )
    thread.start()
    run_id = paused_promotion(before)
    reason = "" if decision == "approve" else "not before the freeze ends"
    submit_answer(run_id, s.people.answer(run_id, answer_as, decision, reason))
    return states.get(timeout=240)


def _promote_runs() -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])))


def test_an_approved_then_a_rejected_production_promotion(setup: Setup) -> None:
    server = setup.server
    d1 = setup.images[0]
    put_verified(setup.cfg, STG, SERVICE, d1)  # from main's tip
    state = _gated(setup, "bob")
    assert state.is_completed(), state.message
    (approved,) = server.deployments(PRD)
    statuses = server.deployment_statuses(approved["id"])
    assert [s["state"] for s in statuses] == ["in_progress", "success"]
    assert "promoted by alice, approved by bob" in statuses[-1]["description"]

    put_verified(setup.cfg, STG, SERVICE, setup.images[2])
    state = _gated(setup, "carol", "reject")
    assert state.is_failed()
    _, rejected = server.deployments(PRD)
    statuses = server.deployment_statuses(rejected["id"])
    assert [s["state"] for s in statuses] == ["failure"]
    assert statuses[0]["description"].startswith("carol rejected release")
    assert server.deployment_states(approved["id"])[-1] == "success"  # still what serves

"""What CI runs, promotions and rollbacks leave on the local GitHub server.

The hooks run as real Prefect flows' state hooks (the session's test server); GitHub is
the local server of tests/plugins/github.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from prefect import flow
from prefect.settings import PREFECT_UI_URL, temporary_settings
from pydantic import SecretStr

from blocks.github import GITHUB_BLOCK, GitHubRepository
from core.errors import ConfigError, PromotionRejected, PromotionRolledBack
from core.records import CiOutcome, PlannedChange, StageResult, make_plan
from flows.ci import ci_failed, ci_outcome
from tasks.github.report import (
    ci_status_hook,
    github_deployment,
    plan_commit,
    report_rejection,
    report_rollback,
)
from tasks.github.statuses import SUMMARY_MARKER
from tests.plugins.github import GitHubServer, github_server
from tests.tasks.plans import D1, D2, D3, image

SHA1, SHA2, SHA3 = ("1" * 40, "2" * 40, "3" * 40)
UI = "http://prefect.example/ui"


@pytest.fixture
def server() -> Iterator[GitHubServer]:
    with github_server() as running, temporary_settings(updates={PREFECT_UI_URL: UI}):
        GitHubRepository(
            repository=running.repository,
            token=SecretStr(running.token),
            api_url=running.url,
            retry_backoff_s=0.05,
            environment_urls={"staging": "https://staging.elice.example"},
        ).save(GITHUB_BLOCK, overwrite=True)
        yield running
        GitHubRepository.delete(GITHUB_BLOCK)


def _results(service: str, *, failed: str | None = None, deploy: bool = False) -> list[StageResult]:
    stages = ["lock", "sync", "ruff", "mypy", "bandit", "pytest"]
    stages += ["image", "scan", "deploy", "health", "record"] if deploy else []
    results = []
    for stage in stages:
        status = "failed" if stage == failed else "passed"
        details: dict[str, Any] = {"coverage": 91, "threshold": 80} if stage == "pytest" else {}
        if stage == "deploy":
            details["digest"] = D1
        results.append(
            StageResult(
                service=service,
                stage=stage,
                status=status,
                summary=f"{stage} {status}",
                details=details,
            )
        )
    return results


def _ci(outcome: CiOutcome, **params: Any) -> Any:
    hook = ci_status_hook(ci_outcome)

    @flow(name="ci-github-test", on_completion=[hook], on_failure=[hook])
    def fake_ci(head: str, environment: str = "dev") -> Any:
        failed = {s: r for r in outcome.results if r.status == "failed" for s in [r.service]}
        return ci_failed(outcome, failed) if failed else outcome

    return fake_ci(**params, return_state=True)


def _latest(server: GitHubServer, sha: str) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for status in server.statuses_for(sha):
        latest[status["context"]] = status
    return latest


def test_a_ci_run_on_main_sets_a_status_per_group_and_deploys_to_dev(server: GitHubServer) -> None:
    results = _results("auth", deploy=True) + _results("billing", deploy=True)
    outcome = CiOutcome(
        commit=SHA1,
        ref="refs/heads/main",
        protected=True,
        shipped=True,
        affected=["auth", "billing"],
        results=results,
    )
    state = _ci(outcome, head=SHA1)
    assert state.is_completed()
    statuses = _latest(server, SHA1)
    assert set(statuses) == {"elice/checks", "elice/tests", "elice/image", "elice/delivery"}
    assert {s["state"] for s in statuses.values()} == {"success"}
    assert statuses["elice/tests"]["description"] == "2 services passed"
    assert statuses["elice/checks"]["target_url"].startswith(f"{UI}/runs/flow-run/")
    (deployment,) = server.deployments("dev")
    assert deployment["sha"] == SHA1
    assert deployment["payload"]["auth"]["digest"] == D1
    assert server.deployment_states(deployment["id"]) == ["in_progress", "success"]
    assert server.requests_to("POST", "/comments") == []  # no pull request: no summary

    _ci(outcome.model_copy(update={"commit": SHA2}), head=SHA2)
    first, second = server.deployments("dev")
    assert server.deployment_states(first["id"])[-1] == "inactive"
    assert server.deployment_states(second["id"]) == ["in_progress", "success"]


def test_a_pull_request_run_fails_its_group_and_keeps_one_summary_comment(
    server: GitHubServer,
) -> None:
    server.open_pull(7, SHA1)
    failing = _results("auth", failed="mypy") + _results("billing")
    outcome = CiOutcome(
        commit=SHA1,
        ref="refs/pull/7/merge",
        affected=["auth", "billing"],
        results=failing,
        failed={"auth": "mypy: mypy failed"},
    )
    state = _ci(outcome, head=SHA1)
    assert state.is_failed()
    statuses = _latest(server, SHA1)
    assert statuses["elice/checks"]["state"] == "failure"
    assert statuses["elice/checks"]["description"] == "1 of 2 failed: auth (mypy)"
    assert statuses["elice/tests"]["state"] == "success"
    assert server.deployments() == []  # a pull request never deploys
    (comment,) = server.comments(7)
    assert comment["body"].startswith(SUMMARY_MARKER)
    assert "auth: mypy failed" in comment["body"]
    assert "91%" in comment["body"]  # coverage per service
    assert f"({UI}/runs/flow-run/" in comment["body"]

    fixed = CiOutcome(
        commit=SHA2,
        ref="refs/pull/7/merge",
        affected=["auth", "billing"],
        results=_results("auth") + _results("billing"),
    )
    server.open_pull(7, SHA2)
    _ci(fixed, head=SHA2)
    (edited,) = server.comments(7)
    assert edited["id"] == comment["id"]
    assert "auth: mypy failed" not in edited["body"]
    assert _latest(server, SHA2)["elice/checks"]["state"] == "success"
    assert len(server.requests_to("POST", "/issues/7/comments")) == 1
    assert len(server.requests_to("PATCH", f"/issues/comments/{comment['id']}")) == 1


def test_a_run_with_nothing_to_check_passes_the_required_contexts(server: GitHubServer) -> None:
    outcome = CiOutcome(commit=SHA1, ref="refs/heads/main", nothing_to_do=True, message="nothing")
    _ci(outcome, head=SHA1)
    statuses = _latest(server, SHA1)
    assert set(statuses) == {"elice/checks", "elice/tests"}
    assert {s["state"] for s in statuses.values()} == {"success"}


def test_github_down_never_fails_the_run_and_is_logged(
    server: GitHubServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.open_pull(7, SHA1)
    server.down = True
    outcome = CiOutcome(
        commit=SHA1, ref="refs/pull/7/merge", affected=["auth"], results=_results("auth")
    )
    with caplog.at_level(logging.WARNING):
        state = _ci(outcome, head=SHA1)
    assert state.is_completed()
    assert "GitHub: statuses of 111111111111 not reported" in caplog.text
    assert "HTTP 503" in caplog.text
    # the rest of the report does not wait through the same retries again
    assert "GitHub: summary on #7 not reported: GitHub was unavailable" in caplog.text
    assert server.token not in caplog.text
    assert len(server.requests) == 4  # the first call, retried, then given up

    server.down = False  # the next run reports again
    _ci(outcome, head=SHA1)
    assert {s["state"] for s in server.statuses_for(SHA1)} == {"success"}
    assert len(server.comments(7)) == 1


def _plan(environment: str = "staging", commits: tuple[str, ...] = (SHA1, SHA1)) -> Any:
    changes = [
        PlannedChange(service=s, current_digest=None, image=image(s, d, c), commit=c)
        for s, d, c in zip(("auth", "billing"), (D2, D3), commits, strict=False)
    ]
    return make_plan(environment, "dev", changes, "alice")


def test_a_promotion_with_an_approval_replaces_the_active_deployment(server: GitHubServer) -> None:
    with github_deployment(_plan(), None):
        pass
    with github_deployment(_plan(commits=(SHA2, SHA2)), "sre-oncall"):
        (first, second) = server.deployments("staging")
        assert server.deployment_states(second["id"]) == ["in_progress"]
    assert server.deployment_states(first["id"]) == ["in_progress", "success", "inactive"]
    statuses = server.deployment_statuses(second["id"])
    assert [s["state"] for s in statuses] == ["in_progress", "success"]
    assert "promoted by alice, approved by sre-oncall" in statuses[-1]["description"]
    assert statuses[-1]["environment_url"] == "https://staging.elice.example"
    assert second["sha"] == SHA2
    assert second["task"] == "deploy:promote"
    assert second["payload"]["services"]["auth"]["digest"] == D2


def test_a_promotion_rolled_back_fails_its_deployment_and_the_old_one_stays(
    server: GitHubServer,
) -> None:
    with github_deployment(_plan(), None):
        pass
    failure = PromotionRolledBack(
        "auth unhealthy; every service put back", failed="auth", restored={}
    )
    with pytest.raises(PromotionRolledBack), github_deployment(_plan(commits=(SHA2, SHA2)), None):
        raise failure
    first, second = server.deployments("staging")
    assert server.deployment_states(first["id"]) == ["in_progress", "success"]
    assert server.deployment_states(second["id"]) == ["in_progress", "failure"]
    assert server.deployment_statuses(second["id"])[-1]["description"].startswith(
        "rolled back: auth unhealthy"
    )


def test_a_rollback_marks_the_active_deployment_inactive_and_redeploys_the_previous(
    server: GitHubServer,
) -> None:
    with github_deployment(_plan(), None):
        pass
    with github_deployment(_plan(commits=(SHA2, SHA2)), "sre-oncall"):
        pass

    @flow(name="rollback-github-test", on_completion=[report_rollback])
    def fake_rollback(environment: str, requested_by: str) -> dict[str, str | None]:
        return {"auth": D2}

    assert fake_rollback("staging", "bob", return_state=True).is_completed()
    first, second, third = server.deployments("staging")
    assert server.deployment_states(second["id"])[-1] == "inactive"
    assert server.deployment_statuses(second["id"])[-1]["description"] == "rolled back by bob"
    assert third["sha"] == first["sha"] == SHA1
    assert third["task"] == "deploy:rollback"
    assert server.deployment_states(third["id"]) == ["in_progress", "success"]


def test_without_the_block_nothing_is_sent() -> None:
    with github_server() as server:
        outcome = CiOutcome(commit=SHA1, ref="refs/heads/main", nothing_to_do=True)
        _ci(outcome, head=SHA1)
        with github_deployment(_plan(), None):
            pass
        assert server.requests == []


def test_a_promotion_names_the_commit_most_of_its_services_were_built_from() -> None:
    assert plan_commit(_plan(commits=(SHA1, SHA1))) == SHA1
    three = _plan(commits=(SHA2, SHA3))
    assert plan_commit(three) == SHA2
    assert plan_commit(_plan(commits=("", ""))) is None


def test_a_rejected_promotion_is_a_failed_deployment_naming_who_rejected_it(
    server: GitHubServer,
) -> None:
    plan = _plan("production")
    message = f"sre-oncall rejected release {plan.release_id}: not today; nothing deployed"

    @flow(name="promote-github-test", on_failure=[report_rejection])
    def fake_promote(environment: str) -> None:
        raise PromotionRejected(message, plan=plan)

    assert fake_promote("production", return_state=True).is_failed()
    (deployment,) = server.deployments("production")
    assert deployment["production_environment"] is True
    statuses = server.deployment_statuses(deployment["id"])
    assert [s["state"] for s in statuses] == ["failure"]
    assert statuses[0]["description"].startswith("sre-oncall rejected release")


def test_a_run_that_ended_before_checking_marks_the_required_contexts_error(
    server: GitHubServer,
) -> None:
    hook = ci_status_hook(ci_outcome)

    @flow(name="ci-github-early-test", on_failure=[hook])
    def early_ci(head: str) -> None:
        raise ConfigError("repository 'someone/else' is not the configured one")

    assert early_ci(SHA3, return_state=True).is_failed()
    statuses = _latest(server, SHA3)
    assert set(statuses) == {"elice/checks", "elice/tests"}
    assert {s["state"] for s in statuses.values()} == {"error"}
    assert "is not the configured one" in statuses["elice/checks"]["description"]


def test_a_rollback_to_a_named_release_redeploys_that_promotion(server: GitHubServer) -> None:
    plans = [  # three releases: their ids differ by digest
        make_plan(
            "staging",
            "dev",
            [
                PlannedChange(
                    service="auth", current_digest=None, image=image("auth", d, sha), commit=sha
                )
            ],
            "alice",
        )
        for d, sha in ((D1, SHA1), (D2, SHA2), (D3, SHA3))
    ]
    for plan in plans:
        with github_deployment(plan, None):
            pass

    @flow(name="rollback-release-github-test", on_completion=[report_rollback])
    def fake_rollback(environment: str, requested_by: str, to_release: str) -> dict[str, str]:
        return {"auth": D2}

    state = fake_rollback("staging", "bob", plans[0].release_id, return_state=True)
    assert state.is_completed()
    *_, third, restored = server.deployments("staging")
    assert server.deployment_states(third["id"])[-1] == "inactive"
    assert restored["sha"] == SHA1
    assert restored["task"] == "deploy:rollback"
    assert server.deployment_states(restored["id"]) == ["in_progress", "success"]

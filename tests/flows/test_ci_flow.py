"""The CI flow end to end: real uv, ruff, mypy, bandit and pytest on copies of real services."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import State

from core.records import CiOutcome
from flows.ci import ci, ci_outcome
from tasks.process import which
from tests.tasks.ci_checkout import commit_all, copy_monorepo

pytestmark = pytest.mark.slow  # real CI runs / servers: out of the fast tier

LINT_BROKEN, TEST_BROKEN, CLEAN = "course", "search", "notification"
SERVICES = [LINT_BROKEN, CLEAN, TEST_BROKEN]  # catalog order, as the outcome lists them
CHECKS = ["lock", "sync", "ruff", "mypy", "bandit", "pytest"]


def outcome_of(state: State[Any]) -> CiOutcome:
    outcome = ci_outcome(state)
    assert outcome is not None, state.message
    return outcome


def statuses(outcome: CiOutcome, service: str) -> dict[str, str]:
    return {r.stage: r.status for r in outcome.results if r.service == service}


def artifacts_of(state: State[Any]) -> dict[str, Any]:
    run_id = state.state_details.flow_run_id
    assert isinstance(run_id, UUID)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in found}


@pytest.fixture(scope="module")
def checkout() -> Path:
    """Three real services: one with an unused import, one with a failing test, one clean."""
    repo = copy_monorepo(Path(tempfile.mkdtemp(prefix="ci-flow-")), SERVICES)
    for name in SERVICES:  # start from formatted code: the only faults are the injected ones
        subprocess.run(
            [which("ruff"), "format", "-q", "."], cwd=repo / "services" / name, check=True
        )
    unused = repo / "services" / LINT_BROKEN / "src" / LINT_BROKEN / "clock.py"
    unused.write_text('"""Clock helpers."""\n\nimport os\n')
    broken = repo / "services" / TEST_BROKEN / "tests" / "test_search_broken.py"
    broken.write_text("def test_broken() -> None:\n    assert sum([1, 1]) == 3\n")
    commit_all(repo, "break two services")
    return repo


@pytest.fixture(scope="module")
def first_run(checkout: Path) -> State[Any]:
    return ci(services=SERVICES, repo=str(checkout), no_cache=True, return_state=True)


def test_failures_stay_in_their_own_branch(first_run: State[Any]) -> None:
    assert first_run.is_failed()
    message = first_run.message or ""
    assert message.startswith("CI failed for 2 of 3 services: "), message
    assert "\n" not in message, message
    assert f"{LINT_BROKEN}: ruff failed: 1 lint findings (F401)" in message
    assert f"{TEST_BROKEN}: pytest failed: tests failed: 1 failed" in message
    assert CLEAN not in message

    outcome = outcome_of(first_run)
    assert outcome.affected == SERVICES
    assert set(outcome.failed) == {LINT_BROKEN, TEST_BROKEN}
    assert outcome.failed[LINT_BROKEN].startswith("ruff: 1 lint findings (F401)")
    assert outcome.failed[TEST_BROKEN].startswith("pytest: tests failed: 1 failed")
    assert statuses(outcome, CLEAN) == dict.fromkeys(CHECKS, "passed")
    assert statuses(outcome, LINT_BROKEN) == {
        **dict.fromkeys(["lock", "sync", "mypy", "bandit"], "passed"),
        "ruff": "failed",
        "pytest": "skipped",
    }
    assert statuses(outcome, TEST_BROKEN) == {**dict.fromkeys(CHECKS, "passed"), "pytest": "failed"}
    lint = next(r for r in outcome.results if r.service == LINT_BROKEN and r.stage == "ruff")
    assert f"src/{LINT_BROKEN}/clock.py:3:8: F401" in lint.excerpt
    assert "F401" in lint.excerpt
    test = next(r for r in outcome.results if r.service == TEST_BROKEN and r.stage == "pytest")
    assert "test_broken" in test.excerpt
    clean_tests = next(r for r in outcome.results if r.service == CLEAN and r.stage == "pytest")
    assert float(clean_tests.details["coverage"] or 0) >= 85


def test_artifacts_report_the_failures(first_run: State[Any]) -> None:
    artifacts = artifacts_of(first_run)
    table = artifacts["ci-stages"]
    assert table.type == "table"
    rows = {row["service"]: row for row in _table_rows(table.data)}
    assert rows[CLEAN]["result"] == "passed"
    assert rows[LINT_BROKEN]["ruff"].startswith("failed")
    assert rows[LINT_BROKEN]["pytest"] == "skipped"
    assert rows[TEST_BROKEN]["pytest"].startswith("failed")
    report = str(artifacts["ci-report"].data)
    assert f"### {LINT_BROKEN}: ruff failed" in report
    assert f"### {TEST_BROKEN}: pytest failed" in report
    assert "3 services: 1 passed, 2 failed" in report


def _table_rows(data: Any) -> list[dict[str, str]]:
    rows = json.loads(data) if isinstance(data, str) else data
    assert isinstance(rows, list)
    return rows


def test_unchanged_second_run_reuses_cached_results(checkout: Path, first_run: State[Any]) -> None:
    assert first_run.is_failed()
    second = ci(services=SERVICES, repo=str(checkout), return_state=True)
    assert second.is_failed()
    outcome = outcome_of(second)
    checks = ["ruff", "mypy", "bandit", "pytest"]
    # the lock changed nothing the first time, and no check of CLEAN runs: no environment
    assert statuses(outcome, CLEAN) == dict.fromkeys(["lock", "sync", *checks], "cached")
    # failures are never cached: they run again and fail again, in a synced environment
    assert statuses(outcome, LINT_BROKEN)["ruff"] == "failed"
    assert statuses(outcome, LINT_BROKEN)["mypy"] == "cached"
    assert statuses(outcome, LINT_BROKEN)["sync"] == "passed"
    assert statuses(outcome, TEST_BROKEN)["pytest"] == "failed"
    assert statuses(outcome, TEST_BROKEN)["sync"] == "passed"
    assert "cached" in outcome.message


def test_nothing_affected_completes_quickly(tmp_path: Path) -> None:
    repo = copy_monorepo(tmp_path / "docs-only", [])
    (repo / "README.md").write_text("# docs only\n")
    head = commit_all(repo, "docs")
    state = ci(repo=str(repo), return_state=True)
    assert state.is_completed()
    outcome = outcome_of(state)
    assert outcome.nothing_to_do
    assert outcome.affected == []
    assert outcome.results == []
    assert outcome.commit == head
    assert outcome.message == f"nothing to do: no service is affected by HEAD~1..{head[:12]}"

"""Stage outcomes from real task states, the stage table, the markdown report, artifacts."""

from __future__ import annotations

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.states import Completed, Failed, Pending

from core.errors import CheckFailed, ToolError
from core.records import StageResult
from tasks.reports import (
    failed_services,
    markdown_report,
    publish_ci_artifacts,
    stage_order,
    stage_outcome,
    stage_table,
    summary_line,
)


def passed(service: str, stage: str, seconds: float = 1.0, **details: float) -> StageResult:
    return StageResult(
        service=service, stage=stage, status="passed", seconds=seconds, details=details
    )


RESULTS = [
    passed("auth", "lock"),
    passed("auth", "ruff", 0.25),
    passed("auth", "pytest", 2.0, coverage=91.5, threshold=85),
    StageResult(service="auth", stage="mypy", status="cached"),
    passed("user", "lock"),
    StageResult(
        service="user",
        stage="ruff",
        status="failed",
        seconds=0.5,
        summary="1 lint findings (F401)",
        excerpt="src/user/main.py:1:8: F401 `os` imported but unused",
    ),
    StageResult(
        service="user", stage="pytest", status="skipped", summary="an earlier stage failed"
    ),
    passed("user", "image", 3.0),
]


def test_stage_order_puts_checks_first_then_later_stages() -> None:
    assert stage_order(RESULTS) == ["lock", "ruff", "mypy", "pytest", "image"]


def test_stage_table_has_a_row_per_service_and_a_column_per_stage() -> None:
    rows = stage_table(RESULTS)
    assert rows == [
        {
            "service": "auth",
            "result": "passed",
            "lock": "passed (1.0s)",
            "ruff": "passed (0.2s)",
            "mypy": "cached",
            "pytest": "passed (2.0s)",
            "image": "-",
        },
        {
            "service": "user",
            "result": "failed",
            "lock": "passed (1.0s)",
            "ruff": "failed (0.5s)",
            "mypy": "-",
            "pytest": "skipped",
            "image": "passed (3.0s)",
        },
    ]


def test_summary_line_and_failed_services() -> None:
    assert (
        summary_line(RESULTS) == "2 services: 1 passed, 1 failed (user: ruff); 8 stages, 1 cached"
    )
    assert list(failed_services(RESULTS)) == ["user"]
    assert summary_line([]) == "0 services: 0 passed, 0 failed; 0 stages, 0 cached"


def test_markdown_report_shows_table_coverage_and_excerpts() -> None:
    report = markdown_report(RESULTS, title="CI of abc123")
    assert report.startswith("# CI of abc123\n")
    assert "| service | result | lock | ruff | mypy | pytest | image |" in report
    assert "| auth | 91.5% | 85% | passed |" in report
    assert "### user: ruff failed" in report
    assert "```\nsrc/user/main.py:1:8: F401 `os` imported but unused\n```" in report
    assert "auth: " not in report.split("## Failures")[1]


def test_stage_outcome_from_each_kind_of_state() -> None:
    ok = passed("auth", "ruff")
    assert stage_outcome("auth", "ruff", Completed(data=ok)) == ok
    cached = stage_outcome("auth", "ruff", Completed(data=ok, name="Cached"))
    assert cached.status == "cached"
    assert cached.seconds == ok.seconds
    lint = CheckFailed("auth", "ruff", "2 lint findings", "a.py:1:1: F401", 0.3, {"n": 2})
    failed = stage_outcome("auth", "ruff", Failed(data=lint))
    assert (failed.status, failed.summary, failed.excerpt, failed.seconds) == (
        "failed",
        "2 lint findings",
        "a.py:1:1: F401",
        0.3,
    )
    assert failed.details == {"n": 2}
    broken = stage_outcome("auth", "sync", Failed(data=ToolError("uv sync: no network")))
    assert broken.status == "failed"
    assert broken.summary == "could not run: uv sync: no network"
    skipped = stage_outcome("auth", "pytest", Pending(name="NotReady"))
    assert skipped.status == "skipped"


def test_publish_creates_table_and_markdown_artifacts() -> None:
    @flow
    def publish() -> str:
        return publish_ci_artifacts(RESULTS, key="ci-report-test")

    state = publish(return_state=True)
    assert state.result() == summary_line(RESULTS)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["ci-report-test-stages", "ci-report-test-report"])
            )
        )
    mine = {a.key: a for a in artifacts if a.flow_run_id == flow_run_id}
    assert mine["ci-report-test-stages"].type == "table"
    assert "user" in str(mine["ci-report-test-stages"].data)
    assert mine["ci-report-test-report"].type == "markdown"
    assert "### user: ruff failed" in str(mine["ci-report-test-report"].data)

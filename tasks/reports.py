"""CI reports: stage outcomes from task states, a service x stage table, a markdown report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State

from core.errors import CheckFailed, StageFailed
from core.records import StageResult, short_digest
from tasks.process import run_logger

CI_STAGES = ("lock", "sync", "ruff", "mypy", "bandit", "pytest")
"""The check stages in pipeline order; later stages (delivery) follow in first-seen order."""

EXCERPT_CHARS = 4000


def described_result(service: str, stage: str, value: object) -> StageResult:
    """A passed StageResult for a stage whose task returns a record of its own.

    Records may offer `summary_line()` and `report_details()` for the report.
    """
    summarize = getattr(value, "summary_line", None)
    detail = getattr(value, "report_details", None)
    summary = str(summarize()) if callable(summarize) else ("done" if value is None else str(value))
    details = dict(detail()) if callable(detail) else {}
    return StageResult(
        service=service, stage=stage, status="passed", summary=summary, details=details
    )


def stage_outcome(service: str, stage: str, state: State[Any]) -> StageResult:
    """The StageResult a finished task run's state stands for.

    Completed -> its result ("cached" when Prefect reused a cached result); failed
    with StageFailed -> "failed" with the tool's summary and excerpt; any other
    failure (a tool that could not run, even after retries) -> "failed" with the
    error; an upstream failure (NotReady) or no run -> "skipped".
    """
    if state.is_completed():
        result = state.result()
        if not isinstance(result, StageResult):
            result = described_result(service, stage, result)
        if state.name == "Cached":
            return result.model_copy(update={"status": "cached"})
        return result
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        error = state.result(raise_on_failure=False)
        if isinstance(error, StageFailed):
            seconds = error.seconds if isinstance(error, CheckFailed) else 0.0
            details = error.details if isinstance(error, CheckFailed) else {}
            return StageResult(
                service=service,
                stage=stage,
                status="failed",
                seconds=seconds,
                summary=error.summary,
                excerpt=error.excerpt,
                details=details,
            )
        summary = str(error) if isinstance(error, BaseException) else (state.message or "")
        return StageResult(
            service=service,
            stage=stage,
            status="failed",
            summary=f"could not run: {summary}".strip(),
            details={"state": state.name},
        )
    return StageResult(
        service=service, stage=stage, status="skipped", summary="an earlier stage failed"
    )


def stage_order(results: Iterable[StageResult]) -> list[str]:
    """The stages present in `results`: check stages first, then the rest as first seen."""
    seen = list(dict.fromkeys(r.stage for r in results))
    return [s for s in CI_STAGES if s in seen] + [s for s in seen if s not in CI_STAGES]


def _services(results: Iterable[StageResult]) -> list[str]:
    return list(dict.fromkeys(r.service for r in results))


def failed_services(results: Iterable[StageResult]) -> dict[str, StageResult]:
    """Each failed service's first failed stage (in stage order)."""
    results = list(results)
    order = {stage: i for i, stage in enumerate(stage_order(results))}
    failed: dict[str, StageResult] = {}
    for result in sorted(results, key=lambda r: order[r.stage]):
        if result.status == "failed" and result.service not in failed:
            failed[result.service] = result
    return {s: failed[s] for s in _services(results) if s in failed}


def stage_table(results: Sequence[StageResult]) -> list[dict[str, str]]:
    """One row per service, one column per stage: `status (seconds)`; `-` for no run."""
    stages = stage_order(results)
    by_key = {(r.service, r.stage): r for r in results}
    failed = failed_services(results)
    rows = []
    for service in _services(results):
        row = {"service": service, "result": "failed" if service in failed else "passed"}
        for stage in stages:
            result = by_key.get((service, stage))
            if result is None:
                row[stage] = "-"
            elif result.status in ("passed", "failed") and result.seconds:
                row[stage] = f"{result.status} ({result.seconds:.1f}s)"
            else:
                row[stage] = result.status
        digests = [
            str(r.details["digest"])
            for r in results
            if r.service == service and r.details.get("digest")
        ]
        if digests:
            row["digest"] = short_digest(digests[0])
        rows.append(row)
    if any("digest" in row for row in rows):
        for row in rows:
            row.setdefault("digest", "-")
    return rows


def summary_line(results: Sequence[StageResult]) -> str:
    """One line: how many services passed and failed, where, and how many stages were cached."""
    services = _services(results)
    failed = failed_services(results)
    cached = sum(1 for r in results if r.status == "cached")
    line = f"{len(services)} services: {len(services) - len(failed)} passed, {len(failed)} failed"
    if failed:
        line += " (" + ", ".join(f"{s}: {r.stage}" for s, r in failed.items()) + ")"
    return line + f"; {len(results)} stages, {cached} cached"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_report(results: Sequence[StageResult], title: str = "CI report") -> str:
    """The whole report: summary, the service x stage table, coverage, failure excerpts."""
    rows = stage_table(results)
    lines = [f"# {title}", "", summary_line(results), ""]
    if rows:
        columns = list(rows[0])
        lines += [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows),
            "",
        ]
    coverage = [r for r in results if r.stage == "pytest" and "coverage" in r.details]
    if coverage:
        lines += [
            "## Coverage",
            "",
            "| service | coverage | threshold | status |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.service} | {r.details['coverage']}% | {r.details.get('threshold', '?')}% "
            f"| {r.status} |"
            for r in coverage
        ]
        lines.append("")
    failures = [r for r in results if r.status == "failed"]
    if failures:
        lines += ["## Failures", ""]
        for r in failures:
            lines += [f"### {r.service}: {r.stage} failed", "", _cell(r.summary), ""]
            if r.excerpt:
                excerpt = r.excerpt[-EXCERPT_CHARS:].replace("```", "'''")
                lines += ["```", excerpt, "```", ""]
    return "\n".join(lines)


@task
def publish_ci_artifacts(results: list[StageResult], key: str = "ci") -> str:
    """Publish the service x stage table and the markdown report as Prefect artifacts.

    Returns:
        The summary line.
    """
    summary = summary_line(results)
    create_table_artifact(
        table=stage_table(results), key=f"{key}-stages", description=f"CI stages: {summary}"
    )
    create_markdown_artifact(
        markdown=markdown_report(results), key=f"{key}-report", description=summary
    )
    run_logger().info("CI: %s", summary)
    return summary

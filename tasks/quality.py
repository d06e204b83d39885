"""Static checks of one service with its own locked tools: ruff, mypy, bandit.

Each check runs the tool from the service's `.venv` (installed by `sync_service`), so
the versions are the service's locked ones, with the configuration every service
shares (files in services/, see `SHARED_CONFIGS`). Findings raise `CheckFailed` (never
retried) with the tool's own output; a tool that cannot run raises `ToolError`.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task

from blocks.catalog import ServiceSpec
from core.errors import CheckFailed, SourceError, ToolError
from core.records import StageResult
from tasks.forking import run_module, venv_tool
from tasks.process import EXCERPT_LINES, STAGE_RETRY_OPTIONS, ToolRun, run_logger, run_tool
from tasks.source import (
    SERVICES_DIR,
    Details,
    scratch_dir,
    service_dir,
    service_env,
    stage_cache_key,
)

TOOL_TIMEOUT_S = 600
_UNFORMATTED = re.compile(r"^(?:(.+?):\d+:\d+: unformatted\b.*|Would reformat: (.+))$", re.M)
_MYPY_SUMMARY = re.compile(r"^Found (\d+) errors? in (\d+) files?", re.M)
_MYPY_ERROR = re.compile(r": error: ")
SHARED_CONFIGS = {"mypy": "mypy.ini", "pytest": "pytest.ini", "bandit": "bandit.yaml"}
"""tool -> its configuration file in services/, shared by every service and passed to the
tool explicitly (ruff finds services/ruff.toml through each pyproject's `extend`)."""


def shared_config(repo: str | Path, tool: str) -> str:
    """The checkout's shared configuration of `tool` (see `SHARED_CONFIGS`), for its -c option.

    Raises:
        SourceError: the checkout has no such file.
    """
    path = Path(repo) / SERVICES_DIR / SHARED_CONFIGS[tool]
    if not path.is_file():
        msg = f"{path} is missing: it holds the {tool} configuration of every service"
        raise SourceError(msg)
    return str(path)


def ruff_commands(report: Path) -> list[list[str]]:
    """The ruff stage's two commands (tool first), run in the service's directory."""
    return [
        ["ruff", "check", "--no-cache", "--output-format", "json", "-o", str(report), "."],
        ["ruff", "format", "--check", "--no-cache", "--output-format", "concise", "."],
    ]


def mypy_command(config: str, cache: Path) -> list[str]:
    """The mypy stage's command (tool first), run in the service's directory."""
    return ["mypy", "--config-file", config, "--cache-dir", str(cache), "--no-color-output", "src"]


def bandit_command(config: str, report: Path) -> list[str]:
    """The bandit stage's command (tool first), run in the service's directory."""
    return ["bandit", "-c", config, "-r", "src", "-q", "-f", "json", "-o", str(report)]


def _run(path: Path, tool: str, *args: str) -> ToolRun:
    return run_tool(
        [venv_tool(path, tool), *args], cwd=path, env=service_env(path), timeout=TOOL_TIMEOUT_S
    )


def passed_result(
    service: str, stage: str, started: float, summary: str, fingerprint: str
) -> StageResult:
    """A passed stage, stamped with the fingerprint it was checked at."""
    seconds = time.monotonic() - started
    run_logger().info("%s: %s passed in %.1fs: %s", service, stage, seconds, summary)
    return StageResult(
        service=service,
        stage=stage,
        status="passed",
        seconds=round(seconds, 3),
        summary=summary,
        details={"fingerprint": fingerprint[:12]},
    )


def failed_check(
    service: str,
    stage: str,
    started: float,
    summary: str,
    excerpt: str,
    details: Details | None = None,
) -> CheckFailed:
    """The CheckFailed to raise for a stage that ran and said no; logs its excerpt."""
    run_logger().error("%s: %s failed: %s\n%s", service, stage, summary, excerpt)
    seconds = round(time.monotonic() - started, 3)
    return CheckFailed(service, stage, summary, excerpt, seconds, details)


def _tally(codes: list[str]) -> str:
    return ", ".join(f"{code} x{n}" if n > 1 else code for code, n in Counter(codes).most_common())


def ruff_findings(report: str) -> list[dict[str, Any]]:
    """The findings of `ruff check --output-format json`.

    Raises:
        ToolError: the output is not ruff's JSON report.
    """
    try:
        findings = json.loads(report)
    except json.JSONDecodeError as exc:
        msg = f"ruff printed no JSON report: {report[:500]}"
        raise ToolError(msg) from exc
    if not isinstance(findings, list):
        msg = f"unexpected ruff report: {report[:500]}"
        raise ToolError(msg)
    return findings


def ruff_excerpt(findings: list[dict[str, Any]], root: Path) -> str:
    """One `path:line:col: CODE message` line per finding."""
    lines = []
    for item in findings[:EXCERPT_LINES]:
        name = Path(item.get("filename") or "?")
        if name.is_absolute() and name.is_relative_to(root):
            name = name.relative_to(root)
        where = item.get("location") or {}
        lines.append(
            f"{name}:{where.get('row', '?')}:{where.get('column', '?')}: "
            f"{item.get('code') or 'syntax'} {item.get('message', '')}"
        )
    return "\n".join(lines)


def unformatted_files(output: str) -> list[str]:
    """The files `ruff format --check --output-format concise` would reformat, in order."""
    files = [m.group(1) or m.group(2) for m in _UNFORMATTED.finditer(output)]
    return list(dict.fromkeys(files))


@task(task_run_name="run_ruff-{service.name}", cache_key_fn=stage_cache_key, **STAGE_RETRY_OPTIONS)
def run_ruff(service: ServiceSpec, repo: str, fingerprint: str = "") -> StageResult:
    """`ruff check` and `ruff format --check` the service (its own ruff configuration).

    Raises:
        CheckFailed: lint findings or unformatted files.
        ToolError: ruff could not run.
    """
    path = service_dir(repo, service)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"ruff-{service.name}-") as scratch:
        out = Path(scratch) / "ruff.json"
        check, fmt = ruff_commands(out)
        checked = _run(path, *check)
        if checked.returncode not in (0, 1) or not out.is_file():
            msg = f"{service.name}: ruff check exited {checked.returncode}: {checked.excerpt(10)}"
            raise ToolError(msg)
        findings = ruff_findings(out.read_text(encoding="utf-8"))
    formatted = _run(path, *fmt)
    if formatted.returncode not in (0, 1):
        msg = f"{service.name}: ruff format exited {formatted.returncode}: {formatted.excerpt(10)}"
        raise ToolError(msg)
    unformatted = unformatted_files(formatted.output)
    if findings or unformatted:
        problems = []
        if findings:
            codes = [str(f.get("code") or "syntax") for f in findings]
            problems.append(f"{len(findings)} lint findings ({_tally(codes)})")
        if unformatted:
            problems.append(f"{len(unformatted)} files need `ruff format`")
        excerpt = "\n".join(
            [ruff_excerpt(findings, path), *(f"would reformat: {u}" for u in unformatted)]
        ).strip()
        raise failed_check(service.name, "ruff", started, "; ".join(problems), excerpt)
    return passed_result(service.name, "ruff", started, "no findings, formatted", fingerprint)


def mypy_summary(output: str) -> str:
    """mypy's own summary (`Found 2 errors in 1 file`), or a count of its error lines."""
    match = _MYPY_SUMMARY.search(output)
    if match:
        return match.group(0)
    return f"{len(_MYPY_ERROR.findall(output))} type errors"


@task(task_run_name="run_mypy-{service.name}", cache_key_fn=stage_cache_key, **STAGE_RETRY_OPTIONS)
def run_mypy(service: ServiceSpec, repo: str, fingerprint: str = "") -> StageResult:
    """`mypy src` with the services' shared (strict) configuration, services/mypy.ini.

    Each service has its own cache directory under the state dir: concurrent runs
    never share mypy's SQLite cache ("database is locked").

    Raises:
        CheckFailed: type errors.
        ToolError: mypy crashed or could not run (exit 2); retried.
    """
    path = service_dir(repo, service)
    started = time.monotonic()
    cache = scratch_dir(repo, service.name, "mypy-cache")
    config = shared_config(repo, "mypy")
    checked = _run(path, *mypy_command(config, cache))
    if checked.returncode == 1:
        raise failed_check(
            service.name, "mypy", started, mypy_summary(checked.output), checked.excerpt()
        )
    if not checked.ok:
        msg = f"{service.name}: mypy exited {checked.returncode}: {checked.excerpt(10)}"
        raise ToolError(msg)
    return passed_result(
        service.name, "mypy", started, checked.output.strip().splitlines()[-1], fingerprint
    )


def bandit_issues(report: dict[str, Any]) -> tuple[str, str]:
    """(summary, excerpt) of a bandit JSON report's issues; ("", "") when there are none."""
    issues = report.get("results") or []
    if not issues:
        return "", ""
    severities = Counter(str(i.get("issue_severity", "?")).lower() for i in issues)
    tests = _tally([str(i.get("test_id", "?")) for i in issues])
    summary = (
        f"{len(issues)} security issues ("
        + ", ".join(f"{n} {sev}" for sev, n in severities.most_common())
        + f"; {tests})"
    )
    excerpt = "\n".join(
        f"{i.get('filename')}:{i.get('line_number')}: {i.get('test_id')} "
        f"[{i.get('issue_severity')}/{i.get('issue_confidence')}] {i.get('issue_text')}"
        for i in issues[:EXCERPT_LINES]
    )
    return summary, excerpt


@task(
    task_run_name="run_bandit-{service.name}", cache_key_fn=stage_cache_key, **STAGE_RETRY_OPTIONS
)
def run_bandit(service: ServiceSpec, repo: str, fingerprint: str = "") -> StageResult:
    """`bandit -c services/bandit.yaml -r src`: security findings of the service's code.

    Raises:
        CheckFailed: bandit reported issues (any severity).
        ToolError: bandit could not run or scan a file.
    """
    path = service_dir(repo, service)
    started = time.monotonic()
    config = shared_config(repo, "bandit")
    with tempfile.TemporaryDirectory(prefix=f"bandit-{service.name}-") as scratch:
        out = Path(scratch) / "bandit.json"
        _, *args = bandit_command(config, out)
        scanned = run_module(repo, path, "bandit", args, service_env(path), TOOL_TIMEOUT_S)
        if scanned.returncode not in (0, 1) or not out.is_file():
            msg = f"{service.name}: bandit exited {scanned.returncode}: {scanned.excerpt(10)}"
            raise ToolError(msg)
        report = json.loads(out.read_text(encoding="utf-8"))
    errors = report.get("errors") or []
    if errors:
        msg = f"{service.name}: bandit could not scan: {errors[:3]}"
        raise ToolError(msg)
    summary, excerpt = bandit_issues(report)
    if summary:
        raise failed_check(service.name, "bandit", started, summary, excerpt)
    loc = report.get("metrics", {}).get("_totals", {}).get("loc", 0)
    return passed_result(service.name, "bandit", started, f"no issues in {loc} lines", fingerprint)

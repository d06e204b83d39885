"""pytest with coverage for one service, in the service's own environment.

The run goes through `tasks.forking.run_module`: in a fork of the checkout's pre-imported
server when one serves the service's environment, else as a process of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from prefect import task

from blocks.catalog import ServiceSpec
from core.errors import ToolError
from core.records import StageResult
from tasks.forking import run_module
from tasks.process import STAGE_RETRY_OPTIONS, ToolRun
from tasks.quality import failed_check, passed_result, shared_config
from tasks.source import (
    Details,
    scratch_dir,
    service_dir,
    service_env,
    stage_cache_key,
)

PYTEST_TIMEOUT_S = 900
_OUTCOME = re.compile(r"^(?:=+ )?(\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", re.M)
# pytest's exit codes: 1 tests failed, 2 interrupted (e.g. collection errors), 5 no tests.
FAILED_EXITS = {1: "tests failed", 2: "test collection failed", 5: "no tests were collected"}


FORK_ONLY_WARNING = (
    "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning"
)
"""Forked runs only: plugins the server imported (anyio's) cannot have their asserts rewritten."""


def run_pytest_process(
    repo: str | Path, path: Path, args: list[str], env: dict[str, str], timeout: float
) -> ToolRun:
    """`python -m pytest args` in the service's environment (`tasks.forking.run_module`).

    Raises:
        ToolError: pytest could not be started or timed out.
    """
    return run_module(repo, path, "pytest", args, env, timeout, fork_args=["-W", FORK_ONLY_WARNING])


def pytest_args(config: str, package: str, scratch: Path) -> list[str]:
    """The arguments of one service's `python -m pytest` (reports written under `scratch`)."""
    return [
        "-q",
        "-c",
        config,
        "-p",
        "no:cacheprovider",
        f"--cov={package}",
        "--cov-report=",
        f"--cov-report=json:{scratch / 'coverage.json'}",
        f"--cov-report=xml:{scratch / 'coverage.xml'}",
    ]


def pytest_outcome(output: str) -> str:
    """pytest's final tally (`1 failed, 3 passed`), or "" when it printed none."""
    found = _OUTCOME.findall(output)
    return found[-1] if found else ""


def total_coverage(report: Path) -> float:
    """The total line (and branch) coverage percentage of a coverage.py JSON report.

    Raises:
        ToolError: the report is missing or not coverage.py's JSON.
    """
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        return float(data["totals"]["percent_covered"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"no usable coverage report at {report}: {exc}"
        raise ToolError(msg) from exc


@task(
    task_run_name="run_pytest-{service.name}", cache_key_fn=stage_cache_key, **STAGE_RETRY_OPTIONS
)
def run_pytest(
    service: ServiceSpec, repo: str, threshold: int, fingerprint: str = ""
) -> StageResult:
    """Run the service's tests with coverage of its package; check the coverage floor.

    pytest and pytest-cov read the services' shared services/pytest.ini (so the rootdir
    is services/); the package measured is the service's.

    Coverage data goes to a per-run COVERAGE_FILE (concurrent services never share
    `.coverage`); the JSON and XML reports are kept under the state dir.

    Raises:
        CheckFailed: failing tests, collection errors, or coverage below `threshold`.
        ToolError: pytest could not run.
    """
    path = service_dir(repo, service)
    reports = scratch_dir(repo, service.name, "coverage")
    config = shared_config(repo, "pytest")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"pytest-{service.name}-") as scratch:
        json_report = Path(scratch) / "coverage.json"
        xml_report = Path(scratch) / "coverage.xml"
        ran = run_pytest_process(
            repo,
            path,
            pytest_args(config, service.package, Path(scratch)),
            {**service_env(path), "COVERAGE_FILE": str(Path(scratch) / ".coverage")},
            PYTEST_TIMEOUT_S,
        )
        outcome = pytest_outcome(ran.output) or f"pytest exited {ran.returncode}"
        if ran.returncode in FAILED_EXITS:
            summary = f"{FAILED_EXITS[ran.returncode]}: {outcome}"
            raise failed_check(service.name, "pytest", started, summary, ran.excerpt())
        if not ran.ok:
            msg = f"{service.name}: pytest exited {ran.returncode}: {ran.excerpt(10)}"
            raise ToolError(msg)
        coverage = round(total_coverage(json_report), 2)
        for report in (json_report, xml_report):
            if report.is_file():
                shutil.copy(report, reports / report.name)
    details: Details = {"coverage": coverage, "threshold": threshold}
    if coverage < threshold:
        summary = f"coverage {coverage:.1f}% is below the {threshold}% threshold ({outcome})"
        raise failed_check(service.name, "pytest", started, summary, ran.excerpt(), details)
    result = passed_result(
        service.name, "pytest", started, f"{outcome}; coverage {coverage:.1f}%", fingerprint
    )
    return result.model_copy(
        update={
            "details": {
                **result.details,
                **details,
                "coverage_xml": str(reports / "coverage.xml"),
            }
        }
    )

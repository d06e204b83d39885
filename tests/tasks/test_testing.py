"""pytest with coverage on a real service, passing, failing and under its threshold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.exceptions import CheckFailed, ToolError
from tasks.source import scratch_dir
from tasks.testing import pytest_outcome, run_pytest, total_coverage
from tests.tasks.ci_checkout import CONFIG, SAMPLE, synced_checkout

SPEC = CONFIG.service(SAMPLE)


@pytest.fixture
def repo() -> str:
    return str(synced_checkout())


@pytest.fixture
def broken_test(repo: str) -> Iterator[Path]:
    path = Path(repo) / "services" / SAMPLE / "tests" / "test_injected_failure.py"
    path.write_text("def test_broken() -> None:\n    assert 1 + 1 == 3\n")
    yield path
    path.unlink(missing_ok=True)


def test_passing_tests_report_coverage(repo: str) -> None:
    result = run_pytest.fn(SPEC, repo, SPEC.coverage_threshold)
    assert result.status == "passed"
    coverage = result.details["coverage"]
    assert isinstance(coverage, float)
    assert SPEC.coverage_threshold <= coverage <= 100
    assert result.details["threshold"] == SPEC.coverage_threshold
    assert "passed" in result.summary
    xml = Path(str(result.details["coverage_xml"]))
    assert xml == scratch_dir(repo, SAMPLE, "coverage") / "coverage.xml"
    assert "<coverage" in xml.read_text()
    assert not (Path(repo) / "services" / SAMPLE / ".coverage").exists()


def test_failing_test_fails_the_stage_with_its_excerpt(repo: str, broken_test: Path) -> None:
    with pytest.raises(CheckFailed) as failed:
        run_pytest.fn(SPEC, repo, SPEC.coverage_threshold)
    error = failed.value
    assert error.stage == "pytest"
    assert error.summary.startswith("tests failed: 1 failed, ")
    assert "test_broken" in error.excerpt
    assert broken_test.name in error.excerpt


def test_coverage_below_threshold_fails(repo: str) -> None:
    uncovered = Path(repo) / "services" / SAMPLE / "src" / SPEC.package / "uncovered.py"
    uncovered.write_text("def never_called() -> int:\n    return 1\n")
    try:
        with pytest.raises(CheckFailed, match="is below the 100% threshold") as failed:
            run_pytest.fn(SPEC, repo, 100)
    finally:
        uncovered.unlink()
    coverage = failed.value.details["coverage"]
    assert isinstance(coverage, float)
    assert 0 < coverage < 100
    assert failed.value.details["threshold"] == 100
    assert f"coverage {coverage:.1f}%" in failed.value.summary


def test_outcome_and_coverage_parsing(tmp_path: Path) -> None:
    assert pytest_outcome("....\n1 failed, 3 passed in 0.52s\n") == "1 failed, 3 passed"
    assert pytest_outcome("== 4 passed, 1 warning in 1.20s ==") == "4 passed, 1 warning"
    assert pytest_outcome("nothing here") == ""
    report = tmp_path / "coverage.json"
    report.write_text(json.dumps({"totals": {"percent_covered": 91.25}}))
    assert total_coverage(report) == 91.25
    with pytest.raises(ToolError, match="no usable coverage report"):
        total_coverage(tmp_path / "missing.json")


def test_the_shared_pytest_ini_applies(repo: str) -> None:
    """services/pytest.ini: --strict-markers, and branch coverage (--cov-branch)."""
    marked = Path(repo) / "services" / SAMPLE / "tests" / "test_injected_marker.py"
    marked.write_text(
        "import pytest\n\n\n@pytest.mark.undeclared\ndef test_marked() -> None:\n    pass\n"
    )
    try:
        with pytest.raises(CheckFailed, match="test collection failed") as failed:
            run_pytest.fn(SPEC, repo, SPEC.coverage_threshold)
    finally:
        marked.unlink()
    assert "'undeclared' not found in `markers`" in failed.value.excerpt
    run_pytest.fn(SPEC, repo, SPEC.coverage_threshold)
    report = json.loads((scratch_dir(repo, SAMPLE, "coverage") / "coverage.json").read_text())
    assert report["meta"]["branch_coverage"] is True
    assert report["totals"]["num_branches"] > 0

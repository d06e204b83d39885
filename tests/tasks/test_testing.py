"""pytest with coverage on a real service, passing, failing and under its threshold."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tasks.forking
import tasks.quality
from core.errors import CheckFailed, ToolError
from tasks.forking import ForkServer, fork_server, stop_fork_servers
from tasks.python_build import lock_service, sync_service
from tasks.quality import run_bandit
from tasks.source import scratch_dir
from tasks.testing import (
    FORK_ONLY_WARNING,
    pytest_outcome,
    run_pytest,
    total_coverage,
)
from tests.tasks.ci_checkout import CONFIG, SAMPLE, copy_monorepo, synced_checkout

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


OTHER = "course"
"""A second service (no authn) for the fork server's tests."""


@pytest.fixture(scope="module")
def two_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A checkout with SAMPLE and OTHER locked and synced; its fork servers stopped after."""
    repo = copy_monorepo(tmp_path_factory.mktemp("fork"), [SAMPLE, OTHER])
    for name in (SAMPLE, OTHER):
        lock_service.fn(CONFIG.service(name), str(repo))
        sync_service.fn(CONFIG.service(name), str(repo))
    yield str(repo)
    stop_fork_servers(repo)


def ready_server(repo: str, service: str) -> ForkServer:
    """The checkout's fork server once it serves `service` (the first request starts it)."""
    path = Path(repo) / "services" / service
    for _ in range(600):
        server = fork_server(repo, path, dict(os.environ))
        if server is not None:
            return server
        time.sleep(0.2)
    pytest.fail("the fork server never became ready")


def test_services_forked_from_one_server_keep_their_own_outcomes(two_services: str) -> None:
    """A failing test in one service fails that service only; each measures its own package."""
    repo = two_services
    server = ready_server(repo, SAMPLE)
    assert ready_server(repo, OTHER) is server
    assert "pytest" in server.info["distributions"]
    broken = Path(repo) / "services" / SAMPLE / "tests" / "test_injected_failure.py"
    broken.write_text("def test_broken() -> None:\n    assert 1 + 1 == 3\n")
    try:
        with pytest.raises(CheckFailed) as failed:
            run_pytest.fn(CONFIG.service(SAMPLE), repo, CONFIG.service(SAMPLE).coverage_threshold)
        other = CONFIG.service(OTHER)
        passed = run_pytest.fn(other, repo, other.coverage_threshold)
    finally:
        broken.unlink()
    assert failed.value.service == SAMPLE
    assert failed.value.summary.startswith("tests failed: 1 failed, ")
    assert "assert (1 + 1) == 3" in failed.value.excerpt  # rewritten asserts: pytest's own
    assert passed.status == "passed"
    assert passed.service == OTHER
    report = json.loads((scratch_dir(repo, OTHER, "coverage") / "coverage.json").read_text())
    assert report["files"]
    assert all(f"/{other.package}/" in f"/{name}" for name in report["files"]), report["files"]
    assert server.alive()  # a failing run ends its own fork, never the server


def test_a_forked_run_is_the_service_own_environment(two_services: str) -> None:
    repo = two_services
    server = ready_server(repo, OTHER)
    path = Path(repo) / "services" / OTHER
    probe = path / "tests" / "test_injected_probe.py"
    probe.write_text(
        "import os, sys\n\n\n"
        "def test_probe() -> None:\n"
        "    print('PREFIX', sys.prefix)\n"
        "    print('CWD', os.getcwd())\n"
        "    print('VENV', os.environ['VIRTUAL_ENV'])\n"
        "    print('SAMPLE', any('/services/auth/' in p for p in sys.path))\n"
    )
    try:
        ran = server.run(
            "pytest",
            ["-q", "-s", "-p", "no:cacheprovider", "-W", FORK_ONLY_WARNING, str(probe)],
            path,
            {**os.environ, "VIRTUAL_ENV": str(path / ".venv")},
            timeout=300,
        )
    finally:
        probe.unlink()
    assert ran.returncode == 0, ran.output
    assert f"PREFIX {path / '.venv'}" in ran.output
    assert f"CWD {path}" in ran.output
    assert "SAMPLE False" in ran.output  # the server's own environment is not on sys.path


def test_an_environment_with_other_versions_is_not_served(
    two_services: str, tmp_path: Path
) -> None:
    server = ready_server(two_services, SAMPLE)
    venv = tmp_path / ".venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to((server.venv / "bin" / "python").resolve())
    for name, version in server.info["distributions"].items():
        (site / f"{name.replace('-', '_')}-{version}.dist-info").mkdir()
    assert server.serves(venv) == ""
    version = server.info["distributions"]["pytest"]
    (site / f"pytest-{version}.dist-info").rename(site / "pytest-0.0.1.dist-info")
    assert server.serves(venv) == f"pytest 0.0.1 (server: {version})"


def test_stopping_the_fork_servers_ends_them(two_services: str) -> None:
    server = ready_server(two_services, SAMPLE)
    stop_fork_servers(two_services)
    assert not server.alive()
    assert not server.socket_path.exists()


def test_bandit_forked_finds_what_its_own_process_finds(
    two_services: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bandit stage runs in a fork of the same server, with the same findings."""
    repo = two_services
    server = ready_server(repo, OTHER)
    assert "bandit" in server.info["distributions"]
    spec = CONFIG.service(OTHER)
    risky = Path(repo) / "services" / OTHER / "src" / spec.package / "injected_risk.py"
    risky.write_text(
        "import subprocess\n\n\ndef run(cmd: str) -> int:\n"
        "    return subprocess.call(cmd, shell=True)\n"
    )
    try:
        with monkeypatch.context() as alone:
            alone.setattr(tasks.forking, "fork_server", lambda *_a, **_k: None)
            with pytest.raises(CheckFailed) as own:
                run_bandit.fn(spec, repo)

        def no_process(*_a: object, **_k: object) -> None:
            pytest.fail("bandit ran as a process of its own, not in the fork server")

        monkeypatch.setattr(tasks.forking, "run_tool", no_process)
        monkeypatch.setattr(tasks.quality, "run_tool", no_process)
        with pytest.raises(CheckFailed) as forked:
            run_bandit.fn(spec, repo)
    finally:
        risky.unlink()
    assert forked.value.summary == own.value.summary
    assert "B602" in forked.value.excerpt
    assert "injected_risk.py" in forked.value.excerpt

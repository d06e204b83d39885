"""ruff, mypy and bandit on a real service with its own tools: clean, then with faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import CheckFailed, SourceError, ToolError
from tasks.quality import (
    bandit_issues,
    mypy_summary,
    run_bandit,
    run_mypy,
    run_ruff,
    shared_config,
    unformatted_files,
    venv_tool,
)
from tests.tasks.ci_checkout import CONFIG, REPO, SAMPLE, synced_checkout

SPEC = CONFIG.service(SAMPLE)


@pytest.fixture
def repo() -> str:
    return str(synced_checkout())


@pytest.fixture
def inject(repo: str) -> Iterator[Path]:
    """A module inside the service's package that a test fills; removed afterwards."""
    path = Path(repo) / "services" / SAMPLE / "src" / SPEC.package / "injected.py"
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.slow  # ruff, mypy twice and bandit on a whole service: 20 s on two busy cores
def test_clean_service_passes_every_check(repo: str) -> None:
    for check, stage in ((run_ruff, "ruff"), (run_mypy, "mypy"), (run_bandit, "bandit")):
        result = check.fn(SPEC, repo, fingerprint="f" * 64)
        assert result.status == "passed", (stage, result)
        assert result.stage == stage
        assert result.service == SAMPLE
        assert result.details["fingerprint"] == "f" * 12
    assert "Success" in run_mypy.fn(SPEC, repo).summary


def test_unused_import_fails_ruff_with_its_finding(repo: str, inject: Path) -> None:
    inject.write_text('"""Injected."""\n\nimport os\n')
    with pytest.raises(CheckFailed) as failed:
        run_ruff.fn(SPEC, repo)
    error = failed.value
    assert error.stage == "ruff"
    assert error.summary == "1 lint findings (F401)"
    assert f"src/{SPEC.package}/injected.py:3:8: F401" in error.excerpt
    assert error.seconds > 0


def test_unformatted_code_fails_ruff(repo: str, inject: Path) -> None:
    inject.write_text('"""Injected."""\n\nVALUE = {  "a":1 }\n')
    with pytest.raises(CheckFailed, match="1 files need `ruff format`") as failed:
        run_ruff.fn(SPEC, repo)
    assert "would reformat:" in failed.value.excerpt
    assert "injected.py" in failed.value.excerpt


def test_type_error_fails_mypy_with_its_summary(repo: str, inject: Path) -> None:
    inject.write_text('"""Injected."""\n\n\ndef half(x: int) -> int:\n    return x / 2\n')
    with pytest.raises(CheckFailed) as failed:
        run_mypy.fn(SPEC, repo)
    assert failed.value.summary == "Found 1 error in 1 file"
    assert "injected.py:5: error: Incompatible return value type" in failed.value.excerpt


def test_shell_injection_fails_bandit(repo: str, inject: Path) -> None:
    inject.write_text(
        '"""Injected."""\n\nimport subprocess\n\n\n'
        "def run(cmd: str) -> int:\n    return subprocess.call(cmd, shell=True)\n"
    )
    with pytest.raises(CheckFailed) as failed:
        run_bandit.fn(SPEC, repo)
    assert "B602" in failed.value.summary
    assert "high" in failed.value.summary
    assert "injected.py:7: B602 [HIGH/HIGH]" in failed.value.excerpt


def test_missing_environment_is_a_tool_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="uv sync"):
        venv_tool(tmp_path, "ruff")


def test_summaries_of_tool_output() -> None:
    concise = "a.py:3:10: unformatted: File would be reformatted\na.py:9:1: unformatted: x\n"
    assert unformatted_files(concise + "Would reformat: b.py\n1 file would be reformatted") == [
        "a.py",
        "b.py",
    ]
    assert mypy_summary("a.py:1: error: x\nFound 2 errors in 1 file (checked 3 source files)") == (
        "Found 2 errors in 1 file"
    )
    assert mypy_summary("a.py:1: error: x\nb.py:2: error: y\n") == "2 type errors"
    assert bandit_issues({"results": []}) == ("", "")
    summary, excerpt = bandit_issues(
        {
            "results": [
                {"test_id": "B105", "issue_severity": "LOW", "filename": "a.py", "line_number": 3},
                {"test_id": "B105", "issue_severity": "LOW", "filename": "b.py", "line_number": 4},
            ]
        }
    )
    assert summary == "2 security issues (2 low; B105 x2)"
    assert excerpt.splitlines()[1].startswith("b.py:4: B105")


def test_the_shared_configs_apply(repo: str, inject: Path) -> None:
    """services/mypy.ini is strict; services/bandit.yaml skips B101 (the pyproject has neither)."""
    inject.write_text('"""Injected."""\n\n\ndef echo(x):\n    return x\n')
    with pytest.raises(CheckFailed) as failed:
        run_mypy.fn(SPEC, repo)
    assert "[no-untyped-def]" in failed.value.excerpt
    inject.write_text(
        '"""Injected."""\n\n\ndef positive(x: int) -> int:\n    assert x > 0\n    return x\n'
    )
    assert run_bandit.fn(SPEC, repo).status == "passed"


def test_a_missing_shared_config_is_named(tmp_path: Path) -> None:
    assert shared_config(REPO, "bandit") == str(REPO / "services" / "bandit.yaml")
    with pytest.raises(SourceError, match=r"services/mypy\.ini is missing"):
        shared_config(tmp_path, "mypy")

"""uv lock / export / sync of a real service, in a copy of the monorepo."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import SourceError
from tasks.python_build import EXPORTS, lock_service, sync_service
from tests.tasks.ci_checkout import CONFIG, SAMPLE, synced_checkout


def test_lock_exports_runtime_and_dev_requirements() -> None:
    repo = synced_checkout()
    service = repo / "services" / SAMPLE
    runtime = (service / "requirements.lock").read_text()
    dev = (service / "requirements-dev.lock").read_text()
    assert {name for name, _ in EXPORTS} == {"requirements.lock", "requirements-dev.lock"}
    assert "fastapi==" in runtime
    assert "pytest==" not in runtime
    assert "pytest==" in dev
    assert "mypy==" in dev
    pinned = [line for line in runtime.splitlines() if line and not line.startswith(" ")]
    # the libs are installed from the source tree, not the index: not exported
    assert not [line for line in pinned if line.startswith(("servicekit", "authn", "-e"))]
    assert (service / "uv.lock").is_file()


def test_sync_installs_the_service_tools_in_its_own_venv() -> None:
    repo = synced_checkout()
    venv = repo / "services" / SAMPLE / ".venv"
    for tool in ("ruff", "mypy", "bandit", "pytest"):
        assert (venv / "bin" / tool).exists(), tool
    result = sync_service.fn(CONFIG.service(SAMPLE), str(repo))
    assert result.status == "passed"
    assert result.stage == "sync"
    assert result.summary.endswith(".venv")


def test_lock_of_a_missing_service_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"auth: no pyproject\.toml"):
        lock_service.fn(CONFIG.service(SAMPLE), str(tmp_path))

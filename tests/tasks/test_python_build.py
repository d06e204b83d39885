"""uv lock / export / sync of a real service, in a copy of the monorepo."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import SourceError
from tasks.python_build import EXPORTS, lock_record, lock_service, sync_service
from tasks.source import read_tool_versions
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


def test_a_lock_that_changed_nothing_is_not_run_again_at_the_same_content() -> None:
    repo = synced_checkout()
    spec = CONFIG.service(SAMPLE)
    versions = read_tool_versions()
    exported = repo / "services" / SAMPLE / "requirements.lock"
    kept = exported.read_text()
    exported.unlink()  # the lock writes it again: this lock changes the checkout
    try:
        missing = lock_record(repo, spec, CONFIG.catalog, versions)
        assert missing is not None
        rewrote = lock_service.fn(spec, str(repo), None, CONFIG.catalog, versions)
        assert rewrote.status == "passed"
        assert exported.read_text() == kept
        assert not missing.exists()  # a lock that rewrote a file is not recorded

        record = lock_record(repo, spec, CONFIG.catalog, versions)
        assert record is not None
        assert record != missing
        first = lock_service.fn(spec, str(repo), None, CONFIG.catalog, versions, reuse=False)
        assert first.status == "passed"
        assert record.is_file()  # this one changed nothing

        started = exported.stat().st_mtime_ns
        again = lock_service.fn(spec, str(repo), None, CONFIG.catalog, versions)
        assert again.status == "cached"
        assert exported.stat().st_mtime_ns == started  # uv did not write it again
        forced = lock_service.fn(spec, str(repo), None, CONFIG.catalog, versions, reuse=False)
        assert forced.status == "passed"
        assert exported.stat().st_mtime_ns != started
    finally:
        exported.write_text(kept)

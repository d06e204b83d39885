"""The user settings: every variable read in one place, unset and empty alike, frozen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import ConfigError
from core.settings import CHECKOUT, VARIABLES, Settings

REPO = Path(__file__).resolve().parents[2]
PASSED_THROUGH = {"tasks/process.py"}
"""Hands the variables on to the tools it runs (their environment), reads none as a setting."""


def test_each_variable_becomes_its_setting(tmp_path: Path) -> None:
    environ = {
        "ELICE_CONFIG": "blocks",
        "ELICE_REPO": str(tmp_path / "repo"),
        "ELICE_STATE_DIR": str(tmp_path / "state"),
        "ELICE_STACK_DIR": str(tmp_path / "stack"),
        "ELICE_STORAGE": "blocks",
        "ELICE_DEPLOY_WAVE": "2",
        "ELICE_LOCK_RENEW_S": "2.5",
        "DOCKER_HOST": "unix:///run/docker.sock",
        "ELICE_TRUST_FILE": str(tmp_path / "trust.yaml"),
        "ELICE_CLOCK": "2026-12-24T10:00:00+09:00",
    }
    assert sorted(environ) == sorted(VARIABLES.values())
    settings = Settings.from_environ(environ)
    assert settings.config == "blocks"
    assert settings.repo == tmp_path / "repo"
    assert settings.resolved_state_dir() == tmp_path / "state"
    assert settings.resolved_stack_dir() == tmp_path / "stack"
    assert settings.storage_from_blocks
    assert settings.deploy_wave == "2"
    assert settings.lock_renew_s == 2.5
    assert settings.docker_host == "unix:///run/docker.sock"
    assert settings.trust_file == tmp_path / "trust.yaml"
    assert settings.clock == "2026-12-24T10:00:00+09:00"


@pytest.mark.parametrize("value", ["0", "soon", "600"])
def test_a_bad_lock_renewal_interval_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match=f"ELICE_LOCK_RENEW_S='{value}'"):
        Settings.from_environ({"ELICE_LOCK_RENEW_S": value})


def test_unset_and_empty_are_the_defaults(tmp_path: Path) -> None:
    empty = Settings.from_environ(dict.fromkeys(VARIABLES.values(), ""))
    assert empty == Settings.from_environ({}) == Settings()
    assert (empty.config, empty.repo, empty.state_dir) == ("", CHECKOUT, CHECKOUT / ".elice")
    assert not empty.storage_from_blocks
    assert empty.docker_host is None
    only_state = Settings.from_environ({"ELICE_STATE_DIR": str(tmp_path)})
    assert only_state.resolved_stack_dir() == tmp_path  # the stack lives in the state dir


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.config = "blocks"  # type: ignore[misc]


@pytest.mark.parametrize("package", ["flows", "tasks", "blocks"])
def test_below_the_command_line_nothing_reads_a_user_setting(package: str) -> None:
    """The variables are read by `Settings.from_environ` only (core/settings.py)."""
    names = set(VARIABLES.values())
    readers = []
    for path in sorted((REPO / package).rglob("*.py")):
        if str(path.relative_to(REPO)) in PASSED_THROUGH:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        readers.extend(
            f"{path.relative_to(REPO)}:{node.lineno}: {node.value}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names
        )
    assert readers == []

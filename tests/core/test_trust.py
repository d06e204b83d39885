"""The worker host's trust file: owner-only, validated, refused when others may write it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.trust import TrustRoots, load_trust_roots, write_trust_roots


def test_trust_roots_round_trip_owner_only(tmp_path: Path) -> None:
    roots = TrustRoots(repository="/srv/monorepo", environments=("dev", "staging"))
    path = write_trust_roots(tmp_path / "trust.yaml", roots)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_trust_roots(path) == roots
    assert roots.may_deploy("staging")
    assert not roots.may_deploy("production")


def test_a_trust_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = write_trust_roots(
        tmp_path / "trust.yaml", TrustRoots(repository="/srv/r", environments=("dev",))
    )
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        load_trust_roots(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("repository: /r\nenvironments: []\n", "environments must be environment names"),
        ("repository: /r\nenvironments: [Prod!]\n", "environments must be environment names"),
        ("repository: /r\nprotected_branch: a..b\nenvironments: [dev]\n", "not a branch name"),
        ("repository: /r\nenvironments: [dev]\nextra: 1\n", "Extra inputs are not permitted"),
        ("environments: [dev]\n", "repository"),
    ],
)
def test_an_invalid_trust_file_names_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "trust.yaml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=problem):
        load_trust_roots(path)


def test_a_missing_trust_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_trust_roots(tmp_path / "nowhere.yaml")

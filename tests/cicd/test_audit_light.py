"""`cicd audit` as a user runs it (the installed console script): the entries from the
ledger's directory, a seed alias resolved, bad input refused, and no Prefect imported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocks.storage import ledger_filesystem
from core.settings import Settings
from tasks.audit import AuditEntry, record_decision
from tests.cicd.light_cli import heavy_of, probe_cicd, run_cicd
from tests.cicd.light_cli import user_env as shell_env


@pytest.fixture
def user_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's own ledger, with two decisions about production; a user's shell."""
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path / "state"))
    store = ledger_filesystem(Settings.from_environ())
    for kind, who in (("approved", "alice"), ("refused", "mallory")):
        entry = AuditEntry(
            environment="production",
            run_id=f"{who:0<8}-run",
            release_id="rel-7",
            kind=kind,
            who=who,
            detail=f"{who}'s answer",
        )
        record_decision(store, entry)
    return shell_env(tmp_path)


def test_audit_lists_the_decisions_as_json_and_as_a_table(user_env: dict[str, str]) -> None:
    done = run_cicd(user_env, "audit", "prod", "--json")  # the seed's name
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["kind"], e["who"], e["environment"]) for e in entries] == [
        ("approved", "alice", "production"),
        ("refused", "mallory", "production"),
    ]
    table = run_cicd(user_env, "audit", "production")
    assert table.returncode == 0, table.stderr
    assert "approval audit of production" in table.stdout
    assert "mallory's answer" in table.stdout
    empty = run_cicd(user_env, "audit", "dev", "--json")
    assert (empty.returncode, empty.stdout) == (0, "")


def test_audit_of_an_unknown_environment_is_exit_2(user_env: dict[str, str]) -> None:
    done = run_cicd(user_env, "audit", "qa")
    assert done.returncode == 2
    assert "unknown environment 'qa'" in done.stderr
    assert "Traceback" not in done.stderr


def test_audit_imports_no_prefect(user_env: dict[str, str]) -> None:
    done = probe_cicd(user_env, "audit", "production", "--json")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert heavy_of(done) == [], done.stderr

"""`cicd audit` as a user runs it (the installed console script): the entries from the
ledger's directory, a seed alias resolved, bad input refused, and no Prefect imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blocks.storage import ledger_filesystem
from core.settings import Settings
from tasks.audit import AuditEntry, record_decision

CICD = Path(sys.executable).with_name("cicd")
HEAVY = ("prefect", "prefect_aws", "prefect_kubernetes", "kubernetes_asyncio", "boto3", "docker")


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        ELICE_STATE_DIR=str(tmp_path / "state"),
        ELICE_STACK_DIR=str(tmp_path / "stack"),
        ELICE_CONFIG="",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        COLUMNS="200",
    )
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CICD), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_audit_lists_the_decisions_as_json_and_as_a_table(user_env: dict[str, str]) -> None:
    done = _run(user_env, "audit", "prod", "--json")  # the seed's name
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["kind"], e["who"], e["environment"]) for e in entries] == [
        ("approved", "alice", "production"),
        ("refused", "mallory", "production"),
    ]
    table = _run(user_env, "audit", "production")
    assert table.returncode == 0, table.stderr
    assert "approval audit of production" in table.stdout
    assert "mallory's answer" in table.stdout
    empty = _run(user_env, "audit", "dev", "--json")
    assert (empty.returncode, empty.stdout) == (0, "")


def test_audit_of_an_unknown_environment_is_exit_2(user_env: dict[str, str]) -> None:
    done = _run(user_env, "audit", "qa")
    assert done.returncode == 2
    assert "unknown environment 'qa'" in done.stderr
    assert "Traceback" not in done.stderr


def test_audit_imports_no_prefect(user_env: dict[str, str]) -> None:
    probe = (
        "import sys\n"
        "sys.argv = ['cicd', 'audit', 'production', '--json']\n"
        "from cicd.entry import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=user_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert "HEAVY []" in done.stderr, done.stderr

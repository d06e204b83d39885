"""A rerun of a commit nothing changed installs nothing; a changed lock file gets a new
environment. Each run is the `ci` flow as `cicd ci` starts it: a fresh worktree of the
exact commit, fetched from the configured repository and removed afterwards.

Which uv commands ran is read from the process runner of `tasks.python_build` (a recorder
that runs every command for real), not from what the stages say of themselves.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tasks.python_build
from blocks.config import state_dir
from core.records import CiOutcome, StageResult
from flows.ci import ci, ci_outcome
from tasks.process import which
from tests.tasks.ci_checkout import SAMPLE, commit_all, copy_monorepo
from tests.trust import pin_repository

pytestmark = pytest.mark.slow  # real CI runs of a service: out of the fast tier

CHECKS = ("ruff", "mypy", "bandit", "pytest")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The configured repository: SAMPLE with a note of its own, so that no stage result
    of another test (the same content) is in the cache before the first run."""
    work = copy_monorepo(tmp_path_factory.mktemp("ci-rerun") / "repo", [SAMPLE])
    (work / "services" / SAMPLE / "NOTES.md").write_text(f"rerun test {uuid.uuid4()}\n")
    commit_all(work, "a content of its own")
    with pytest.MonkeyPatch.context() as mp:
        pin_repository(mp, work.parent, work)  # this host's repository
        yield work


def run_ci(head: str, monkeypatch: pytest.MonkeyPatch) -> tuple[CiOutcome, list[str]]:
    """`cicd ci --services SAMPLE --no-deliver` of `head`; its outcome and the uv commands
    it ran (`uv lock`, `uv export ...`, `uv sync ...`)."""
    ran: list[str] = []
    real = tasks.python_build.run_tool

    def recorded(args: list[str], **kwargs: Any) -> Any:
        ran.append(" ".join(args[1:3]))
        return real(args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tasks.python_build, "run_tool", recorded)
        state = ci(services=[SAMPLE], head=head, deliver=False, return_state=True)
    outcome = ci_outcome(state)
    assert outcome is not None, state.message
    assert state.is_completed(), state.message
    return outcome, ran


def by_stage(outcome: CiOutcome) -> dict[str, StageResult]:
    return {r.stage: r for r in outcome.results}


def workspaces() -> list[Path]:
    folder = state_dir() / "git" / "workspaces"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_rerun_with_nothing_changed_syncs_nothing_and_reuses_every_result(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = commit_all(repo, "nothing new")
    before = workspaces()
    first, first_uv = run_ci(head, monkeypatch)
    assert {s: r.status for s, r in by_stage(first).items()} == dict.fromkeys(
        ["lock", "sync", *CHECKS], "passed"
    )
    assert "sync --frozen" in first_uv
    assert "lock" in first_uv

    again, again_uv = run_ci(head, monkeypatch)
    assert again_uv == []  # no uv lock, export or sync: nothing was installed
    stages = by_stage(again)
    assert {s: r.status for s, r in stages.items()} == dict.fromkeys(
        ["lock", "sync", *CHECKS], "cached"
    )
    assert stages["sync"].summary == "not needed: mypy, ruff, bandit, pytest cached"
    for stage in CHECKS:  # the first run's own results, reused
        found, earlier = stages[stage], by_stage(first)[stage]
        assert (found.summary, found.details) == (earlier.summary, earlier.details)
    assert again.commit == first.commit == head
    assert workspaces() == before  # both worktrees are gone


def test_a_changed_lock_file_gets_a_new_environment(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = commit_all(repo, "before the change")
    run_ci(head, monkeypatch)  # this content's results are in the cache
    service = repo / "services" / SAMPLE
    pyproject = service / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"bandit>=1.8"', '"bandit>=1.8", "anyio"'))
    subprocess.run([which("uv"), "lock", "-q"], cwd=service, check=True)
    lock_diff = subprocess.run(
        ["git", "-C", str(repo), "diff", "--stat", "--", f"services/{SAMPLE}/uv.lock"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "uv.lock" in lock_diff.stdout  # the lock file itself changed
    changed = commit_all(repo, "anyio in the dev group")

    outcome, ran = run_ci(changed, monkeypatch)
    assert "sync --frozen" in ran  # a new environment for the new lock
    assert {s: r.status for s, r in by_stage(outcome).items()} == dict.fromkeys(
        ["lock", "sync", *CHECKS], "passed"
    )
    again, again_uv = run_ci(changed, monkeypatch)
    assert again_uv == []
    assert {r.status for r in again.results} == {"cached"}

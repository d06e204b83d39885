"""CI checks exactly the commit it is given, fetched from the configured repository.

A real bare git remote takes pushes after the mirror exists; the `elice-repository`
block points at it. A pull request's commit is checked and its image built, and
nothing is deployed or recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from blocks.config import state_dir
from blocks.notifications import SLACK_BLOCK, SlackChannel
from blocks.stack import StackInfo
from core.records import CiOutcome
from flows.ci import ci, ci_outcome
from tests.ledgers import current_ledger
from tests.plugins.receivers import Receiver
from tests.tasks.ci_checkout import REPO, commit_all, copy_monorepo, git
from tests.trust import pin_repository

pytestmark = pytest.mark.slow  # real CI runs / servers: out of the fast tier

SERVICE = "auth"
ENV = "ci-src"


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A clone to push from, and its bare remote, pinned as this host's repository."""
    root = tmp_path_factory.mktemp("ci-source")
    work = copy_monorepo(root / "work", [SERVICE])
    bare = root / "remote.git"
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    git(work, "remote", "add", "origin", str(bare))
    git(work, "push", "-q", "origin", "main")
    mp = pytest.MonkeyPatch()
    pin_repository(mp, root, bare)
    yield work, bare
    mp.undo()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    data["environments"] = [
        {
            "name": ENV,
            "namespace": "elice-ci-src",
            "replicas": {"min": 1, "max": 1},
            "log_level": "DEBUG",
            "storage": "minio",
            "local_port_offset": 37000,
        }
    ]
    path = tmp_path_factory.mktemp("ci-source-config") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _push(work: Path, branch: str, text: str) -> str:
    (work / "services" / SERVICE / "CHANGES.md").write_text(text)
    sha = commit_all(work, text)
    git(work, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
    return sha


def _outcome(state: Any) -> CiOutcome:
    outcome = ci_outcome(state)
    assert outcome is not None, state.message
    return outcome


def _workspaces() -> list[Path]:
    folder = state_dir() / "git" / "workspaces"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_ci_checks_exactly_the_pushed_commit(remote: tuple[Path, Path], config_file: str) -> None:
    work, _ = remote
    before = _workspaces()
    sha = _push(work, "main", "pushed after the mirror exists\n")
    state = ci(
        services=[SERVICE], head=sha, ref="refs/heads/main", environment=ENV,
        config_source=config_file,
        return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    outcome = _outcome(state)
    assert outcome.commit == sha
    assert outcome.ref == "refs/heads/main"
    assert not outcome.shipped  # deliver was not asked
    assert {r.stage for r in outcome.results} == {
        "lock", "sync", "ruff", "mypy", "bandit", "pytest",
    }  # fmt: skip
    assert _workspaces() == before  # the worktree is gone


def test_a_pull_request_builds_its_image_and_ships_nothing(
    remote: tuple[Path, Path], config_file: str, stack: StackInfo
) -> None:
    work, _ = remote
    git(work, "checkout", "-q", "-b", "feature")
    sha = _push(work, "feature", "a pull request\n")
    git(work, "checkout", "-q", "main")
    before = current_ledger().current(ENV)
    state = ci(
        services=[SERVICE], head=sha, ref="refs/pull/1/merge", deliver=True,
        environment=ENV, config_source=config_file, return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    outcome = _outcome(state)
    assert outcome.commit == sha
    assert not outcome.shipped
    stages = {r.stage: r.status for r in outcome.results}
    assert stages["image"] == "passed"
    assert "scan" in stages
    assert not {"sbom", "deploy", "health", "record"} & set(stages)
    assert current_ledger().current(ENV).revision == before.revision  # nothing recorded


def test_another_repository_is_refused(remote: tuple[Path, Path]) -> None:
    state = ci(services=[SERVICE], repository="someone/else", return_state=True)
    assert state.is_failed()
    assert "'someone/else' is not the configured one (elice/monorepo)" in (state.message or "")


def test_a_failed_run_of_main_tells_slack_and_a_pull_request_does_not(
    remote: tuple[Path, Path], config_file: str, running_receiver: Receiver
) -> None:
    work, _ = remote
    SlackChannel(
        bot_token=SecretStr("xoxb-ci-test"), channel="#ci", base_url=running_receiver.slack_base_url
    ).save(SLACK_BLOCK, overwrite=True)
    try:
        pull = ci(repository="someone/else", ref="refs/pull/3/merge", return_state=True)
        assert pull.is_failed()
        main = ci(repository="someone/else", ref="refs/heads/main", return_state=True)
        assert main.is_failed()
        (refused,) = running_receiver.wait_for(1)
        # a commit on main whose test fails: the run's own outcome names the failure
        broken = work / "services" / SERVICE / "tests" / "test_broken.py"
        broken.write_text("def test_broken() -> None:\n    assert 1 + 1 == 3\n")
        sha = commit_all(work, "break a test")
        git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
        failed = ci(
            services=[SERVICE], head=sha, environment=ENV, config_source=config_file,
            return_state=True,
        )  # fmt: skip
        assert failed.is_failed()
        _, red = running_receiver.wait_for(2)
    finally:
        SlackChannel.delete(SLACK_BLOCK)
    assert "Release failed" in json.dumps(refused.payload())
    assert "is not the configured one" in json.dumps(refused.payload())
    text = json.dumps(red.payload())
    assert f"{SERVICE}: pytest failed" in text
    assert sha[:12] in text
    assert len(running_receiver.requests) == 2  # the pull request's failure sent nothing

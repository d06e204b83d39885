"""GitHub Actions' own command lines, run against a real Prefect server and a real worker.

The `prefect deployment run` lines are read from .github/workflows/ci.yml (so the test
cannot drift from the workflow), their `${{ ... }}` expressions filled in as GitHub
would for a push or a pull request, and run with bash. The commits are pushed to a bare
git remote after the worker started; the worker's trust file pins that remote.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import docker
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from blocks.stack import StackInfo
from reconcile.setup import ensure_setup
from stack.worker import ensure_worker, log_file, stop_worker
from tests.ledgers import current_ledger
from tests.runs import failures_of, wait_for_log
from tests.tasks.ci_checkout import REPO, commit_all, copy_monorepo, git

CI_YML = REPO / ".github" / "workflows" / "ci.yml"
SERVICE = "auth"
RUN_IDS = itertools.count(4242)  # GitHub gives every workflow run its own id


def _step(job: str) -> dict[str, Any]:
    steps = yaml.safe_load(CI_YML.read_text())["jobs"][job]["steps"]
    (step,) = [s for s in steps if "prefect deployment run" in s.get("run", "")]
    return step


def _github(expression: str, context: dict[str, str]) -> str:
    """Fill `${{ ... }}` as GitHub does, for the few expressions the workflow uses."""

    def value(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if expr in context:
            return context[expr]
        # `a && b || c`: the pull_request / push choice of BASE_SHA and HEAD_SHA
        choice = re.fullmatch(r"github\.event_name == '(\w+)' && ([\w.]+) \|\| ([\w.]+)", expr)
        if choice:
            event, then, otherwise = choice.groups()
            return context[then if context["github.event_name"] == event else otherwise]
        msg = f"the test does not know how GitHub evaluates {expr!r}"
        raise AssertionError(msg)

    return re.sub(r"\$\{\{(.*?)\}\}", value, expression, flags=re.S)


def _run_ci_step(context: dict[str, str]) -> subprocess.CompletedProcess[str]:
    step = _step("ci")
    env = {key: _github(str(raw), context).strip() for key, raw in step["env"].items()}
    command = _github(step["run"], context)
    return subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env={**os.environ, **env, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _push(work: Path, branch: str, path: str, text: str) -> str:
    (work / path).write_text(text)
    sha = commit_all(work, f"change {path}")
    git(work, "push", "-q", "-f", "origin", f"HEAD:refs/heads/{branch}")
    return sha


def _context(event: str, before: str, sha: str, ref: str) -> dict[str, str]:
    context = {
        "github.event_name": event,
        "github.repository": "elice/monorepo",
        "github.ref": ref,
        "github.run_id": str(next(RUN_IDS)),
        "github.run_attempt": "1",
        "github.event.before": before,
        "github.sha": sha,
        "github.event.pull_request.base.sha": before,
        "github.event.pull_request.head.sha": sha,
    }
    return context


CRASH_SIGNS = ("unexpected exception", "Unexpected result for failed state", "TypeError")


def _ended_failed_without_a_crash(run_id: UUID, worker_said: str) -> None:
    """The run ended Failed with one line naming the failed stage; no crash in any log."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None
    assert state.is_failed(), state
    message = state.message or ""
    assert message.startswith(f"CI failed for 1 of 1 services: {SERVICE}: pytest failed: "), message
    assert "\n" not in message, message
    assert wait_for_log(run_id, "Finished in state Failed")  # the run's last line has arrived
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    flow_logs = "\n".join(log.message for log in logs if log.task_run_id is None)
    assert f"Finished in state Failed({message!r})" in flow_logs, flow_logs
    assert "Traceback" not in flow_logs, flow_logs
    assert str(run_id) in worker_said  # the worker ran it, and its output is in this part
    for sign in CRASH_SIGNS:
        assert sign not in flow_logs, flow_logs
        assert sign not in worker_said, worker_said


def _run_named(name: str) -> UUID:
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
        )
    return run.id


@pytest.fixture(scope="module")
def team(
    tmp_path_factory: pytest.TempPathFactory, stack: StackInfo
) -> Iterator[tuple[Path, str, Path]]:
    """Deployments and a worker on the test server; a bare remote holding the monorepo.

    Yields the working copy, its first commit and the worker's log file.
    """
    root = tmp_path_factory.mktemp("gha")
    work = copy_monorepo(root / "work", [SERVICE], pipeline=True)
    bare = root / "remote.git"
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    git(work, "remote", "add", "origin", str(bare))
    git(work, "push", "-q", "origin", "main")
    first = git(work, "rev-parse", "HEAD").strip()
    api = str(PREFECT_API_URL.value())
    ensure_setup(api)
    ensure_worker(root / "worker", api, repository=str(bare), repository_name="elice/monorepo")
    try:
        yield work, first, log_file(root / "worker")
    finally:
        stop_worker(root / "worker")
        client = docker.DockerClient(base_url=stack.docker_host)
        for container in client.containers.list(all=True, filters={"name": "elice-dev-"}):
            container.remove(force=True)
        client.close()


def test_push_pull_request_failure_and_nightly_through_the_workflow_commands(
    team: tuple[Path, str, Path],
) -> None:
    work, before, worker_log = team
    source = work / "services" / SERVICE / "src" / SERVICE

    # a good push to main: the command exits 0, the run checked that SHA, dev serves it
    good = _push(work, "main", f"services/{SERVICE}/src/{SERVICE}/notes.py", '"""Notes."""\n')
    context = _context("push", before, good, "refs/heads/main")
    done = _run_ci_step(context)
    name = f"gha-{context['github.run_id']}-1"
    assert done.returncode == 0, failures_of(_run_named(name))
    assert wait_for_log(_run_named(name), f"at {good[:12]}")
    record = current_ledger().current("dev").services[SERVICE]
    assert record.commit == good
    assert record.ref == "refs/heads/main"
    assert record.repository == "elice/monorepo"
    shipped = current_ledger().current("dev").revision

    # a pull request: checks and an image, nothing deployed or recorded; exit 0
    git(work, "checkout", "-q", "-b", "feature")
    pull = _push(work, "feature", f"services/{SERVICE}/src/{SERVICE}/extra.py", '"""Extra."""\n')
    git(work, "checkout", "-q", "main")
    done = _run_ci_step(_context("pull_request", good, pull, "refs/pull/1/merge"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert current_ledger().current("dev").revision == shipped
    assert current_ledger().current("dev").services[SERVICE].commit == good

    # a push whose test fails: the command exits 1; the run ends Failed with one line and
    # neither its logs nor the worker's hold an engine traceback
    (source.parent.parent / "tests" / "test_broken.py").write_text(
        "def test_broken() -> None:\n    assert 1 + 1 == 3\n"
    )
    broken = _push(work, "main", f"services/{SERVICE}/CHANGES.md", "broken\n")
    logged_before = len(worker_log.read_text())
    context = _context("push", good, broken, "refs/heads/main")
    done = _run_ci_step(context)
    assert done.returncode == 1, done.stdout + done.stderr
    assert current_ledger().current("dev").revision == shipped
    _ended_failed_without_a_crash(
        _run_named(f"gha-{context['github.run_id']}-1"), worker_log.read_text()[logged_before:]
    )

    # fixed on main; the nightly deployment takes the newest commit on main when it starts
    (source.parent.parent / "tests" / "test_broken.py").unlink()
    fixed = _push(work, "main", f"services/{SERVICE}/CHANGES.md", "fixed\n")
    nightly = run_deployment(
        "ci/nightly-rebuild", parameters={"services": [SERVICE]}, timeout=900, poll_interval=2
    )
    assert nightly.state is not None
    assert nightly.state.is_completed(), nightly.state
    assert wait_for_log(nightly.id, f"at {fixed[:12]}")
    assert current_ledger().current("dev").services[SERVICE].commit == fixed

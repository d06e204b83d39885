"""`cicd stack up` leaves a server that works as the UI uses it: deployments, a worker, schedules.

A stack of its own in a temporary directory (reusing the session's engine): its Prefect
server gets the pool, limits, blocks and deployments, and a supervised worker; a run of
`ci/ci` started through the API with the deployment's defaults (what the UI's Run button
posts) completes on that worker; `cicd stack down` stops the worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from blocks.repository import REPOSITORY_BLOCK, GitRepository
from blocks.stack import StackInfo, load_stack_info
from cicd.stack import stop_stack
from cicd.stack_cli import app
from cicd.worker import worker_pid
from tests.ops.runs import wait_for_log
from tests.tasks.ci_checkout import commit_all, copy_monorepo, git


def test_stack_up_serves_deployments_and_a_worker_runs_ci_with_its_defaults(
    stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "stack"
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    monkeypatch.setenv("ELICE_STACK_DIR", str(root))
    work = copy_monorepo(tmp_path / "work", [])
    (work / "README.md").write_text("# docs only\n")
    commit_all(work, "docs")  # the tip of main changes no service
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    try:
        up = CliRunner().invoke(app, ["up"])
        assert up.exit_code == 0, up.output
        assert "deployments: work pool, limits, blocks, deployments of prefect.yaml" in up.output
        assert "worker: process worker on pool elice-process" in up.output
        info = load_stack_info(root)
        assert info is not None
        assert info.prefect_api_url
        assert worker_pid(root) is not None
        with temporary_settings(updates={PREFECT_API_URL: info.prefect_api_url}):
            with get_client(sync_client=True) as client:
                deployments = {d.name: d for d in client.read_deployments()}
                assert {"ci", "nightly-rebuild", "promote", "rollback", "health-check"} <= set(
                    deployments
                )
                [nightly] = deployments["nightly-rebuild"].schedules
                assert nightly.active
            GitRepository(url=str(bare)).save(REPOSITORY_BLOCK, overwrite=True)
            run = run_deployment("ci/ci", timeout=300, poll_interval=2)  # its defaults only
            assert run.state is not None
            assert run.state.is_completed(), run.state
            # the run's own logs reach the server when its process exits: wait for them
            assert wait_for_log(run.id, "nothing to do"), "the run never said 'nothing to do'"
        again = CliRunner().invoke(app, ["up"])
        assert again.exit_code == 0, again.output
        assert "worker: running (pid" in again.output
        APILogWorker.drain_all(timeout=30)  # what this process sent that server goes out now
        EventsWorker.drain_all(timeout=30)
        down = CliRunner().invoke(app, ["down"])
        assert down.exit_code == 0, down.output
        assert "worker" in down.output
        assert worker_pid(root) is None
    finally:
        stop_stack(root)

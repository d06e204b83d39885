"""`cicd stack up` leaves a server that works as the UI uses it: deployments, a worker, schedules.

A stack of its own in a temporary directory (reusing the session's engine): its Prefect
server gets the pool, limits, blocks and deployments, and a supervised worker; a run of
`ci/ci` started through the API with the deployment's defaults (what the UI's Run button
posts) completes on that worker; `cicd stack down` stops the worker. The stack's Slack
receiver reads its secret and users where the gate does (the server's Secret block, the
protected approval policy) and hands a press it accepts to that server.

The server requires the stack's auth string (`<stack dir>/prefect-auth`, 0600): an API
call without it is refused (401), the worker, the receiver and `cicd status` send it, and
it shows in no process's command line and in no log of the stack.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from blocks.approvals import POLICY_FILE
from blocks.stack import StackInfo, load_stack_auth, load_stack_info, stack_auth_file
from cicd.stack_cli import app
from daemons.slack_receiver import ACTIONS_PATH
from stack.control import stop_stack
from stack.supervisor import part_log
from stack.worker import PRODUCTION_WORKER, worker_pid
from tasks.approval import SLACK_SECRET_BLOCK
from tasks.slack_actions import APPROVE_ACTION
from tests.runs import wait_for_log
from tests.slack_requests import button_press, slack_signed
from tests.tasks.ci_checkout import commit_all, copy_monorepo, git

SLACK_USER = "U0TEAM001"
SIGNING = "4c1f9e2d7a6b5c3d-team-signing"
RUN = "5d2c7e1a-3b4f-4c6d-8e9f-0a1b2c3d4e5f"


def presses_reach_the_server(url: str) -> None:
    """The stack's Slack receiver judges presses with the server's Secret block and the
    protected policy's users, and hands a good one to that server (where no run waits)."""

    def post(user: str, secret: str = SIGNING) -> httpx.Response:
        body = button_press(APPROVE_ACTION, user, json.dumps({"run_id": RUN, "release_id": "r1"}))
        return httpx.post(url, content=body, headers=slack_signed(body, secret), timeout=30)

    unsaved = post(SLACK_USER)
    assert unsaved.status_code == 503, unsaved.text
    assert "signing secret (Secret block) is not saved" in unsaved.text
    Secret(value=SIGNING).save(SLACK_SECRET_BLOCK, overwrite=True)
    assert post(SLACK_USER, secret="another-secret").status_code == 401
    assert post("U0STRANGER").status_code == 403
    handed_on = post(SLACK_USER)
    assert handed_on.status_code == 409, handed_on.text
    assert f"no flow run {RUN}" in handed_on.text


def api_refuses_strangers(api_url: str, auth: str) -> None:
    """Without the auth string (or with another) the stack's API answers 401; with it, 200.
    Prefect leaves GET /api/health open for probes: it says nothing stored."""
    filter_url = f"{api_url}/deployments/filter"
    assert httpx.post(filter_url, json={}, timeout=30).status_code == 401
    user, _, password = auth.partition(":")
    wrong = httpx.post(filter_url, json={}, auth=(user, "not-" + password), timeout=30)
    assert wrong.status_code == 401
    assert httpx.post(filter_url, json={}, auth=(user, password), timeout=30).status_code == 200
    assert httpx.get(f"{api_url}/health", timeout=30).status_code == 200


def auth_is_nowhere_public(root: Path, auth: str) -> None:
    """Neither the string nor its password is in any process's argv or the stack's logs."""
    password = auth.partition(":")[2]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        assert password not in argv, f"pid {proc.name}'s argv holds the auth string"
    for part in ("prefect", "worker", "worker-production", "slack-receiver"):
        log = part_log(root, part).read_text(errors="replace")
        assert log, f"{part} wrote no log"
        assert password not in log, f"{part}'s log holds the auth string"


def cicd_status(root: Path, auth: str | None = None) -> subprocess.CompletedProcess[str]:
    """`cicd status --json` as a user runs it: no PREFECT_API_URL, the stack's directory;
    `auth`: a PREFECT_API_AUTH_STRING of the user's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["ELICE_STACK_DIR"] = str(root)
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth
    return subprocess.run(
        [str(Path(sys.executable).with_name("cicd")), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_stack_up_serves_deployments_and_a_worker_runs_ci_with_its_defaults(
    stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "stack"
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    monkeypatch.setenv("ELICE_STACK_DIR", str(root))
    work = copy_monorepo(tmp_path / "work", [], pipeline=True)
    (work / "README.md").write_text("# docs only\n")
    (work / POLICY_FILE).write_text(f"slack_users:\n  {SLACK_USER}: alice\n")
    commit_all(work, "docs")  # the tip of main changes no service
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    try:
        up = CliRunner().invoke(app, ["up", "--repository", str(bare)])
        assert up.exit_code == 0, up.output
        assert "deployments: work pools, limits, blocks, deployments of prefect.yaml" in up.output
        assert "worker: process worker on pool elice-process (deploys into dev, staging)" in (
            up.output
        )
        assert "worker-production: process worker on pool elice-production (deploys into" in (
            up.output
        )
        info = load_stack_info(root)
        assert info is not None
        assert info.prefect_api_url
        assert worker_pid(root) is not None
        assert worker_pid(root, PRODUCTION_WORKER) is not None
        auth = load_stack_auth(root)
        assert auth is not None
        assert stat.S_IMODE(stack_auth_file(root).stat().st_mode) == 0o600
        assert auth not in up.output
        assert f'PREFECT_API_AUTH_STRING="$(cat {stack_auth_file(root)})"' in up.output
        api_refuses_strangers(info.prefect_api_url, auth)
        with temporary_settings(
            updates={PREFECT_API_URL: info.prefect_api_url, PREFECT_API_AUTH_STRING: auth}
        ):
            with get_client(sync_client=True) as client:
                deployments = {d.name: d for d in client.read_deployments()}
                assert {"ci", "nightly-rebuild", "promote", "rollback", "health-check"} <= set(
                    deployments
                )
                [nightly] = deployments["nightly-rebuild"].schedules
                assert nightly.active
            assert info.slack_receiver_url
            assert "slack-receiver" in up.output
            presses_reach_the_server(info.slack_receiver_url + ACTIONS_PATH)
            run = run_deployment("ci/ci", timeout=300, poll_interval=2)  # its defaults only
            assert run.state is not None
            assert run.state.is_completed(), run.state
            # the run's own logs reach the server when its process exits: wait for them
            assert wait_for_log(run.id, "nothing to do"), "the run never said 'nothing to do'"
        status = cicd_status(root)  # reads the saved deploy target: with the stack's string
        assert status.returncode == 0, status.stderr
        assert {row["environment"] for row in json.loads(status.stdout)} >= {"dev"}
        wrong = "admin:" + "w" * 43  # the user's own (wrong) string is the one sent
        refused = cicd_status(root, auth=wrong)
        assert refused.returncode != 0, refused.stdout
        assert "401" in refused.stderr + refused.stdout
        assert wrong[6:] not in refused.stderr + refused.stdout
        again = CliRunner().invoke(app, ["up"])
        assert again.exit_code == 0, again.output
        assert "prefect: running at" in again.output  # the same string: reused
        assert load_stack_auth(root) == auth
        assert "worker: running (pid" in again.output
        assert "worker-production: running (pid" in again.output
        assert "slack-receiver: running at" in again.output  # kept, not restarted
        auth_is_nowhere_public(root, auth)
        APILogWorker.drain_all(timeout=30)  # what this process sent that server goes out now
        EventsWorker.drain_all(timeout=30)
        down = CliRunner().invoke(app, ["down"])
        assert down.exit_code == 0, down.output
        assert "worker, worker-production" in down.output
        assert worker_pid(root) is None
        assert worker_pid(root, PRODUCTION_WORKER) is None
        assert "slack-receiver" in down.output
    finally:
        stop_stack(root)

"""prefect.yaml deploys for real against the test server, with its schedules and pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from reconcile.setup import ensure_setup

REPO = Path(__file__).resolve().parents[2]
PULL = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ELICE_REPO }}"}}]


def _prefect(*args: str) -> subprocess.CompletedProcess[str]:
    # No ELICE_REPO here: `prefect deploy` would bake this checkout's path into the pull
    # step, where each worker must resolve its own.
    env = {k: v for k, v in os.environ.items() if k != "ELICE_REPO"}
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_file_says_what_the_team_runs() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["pull"] == PULL
    deployments = {d["name"]: d for d in spec["deployments"]}
    # production's deployments on production's pool (only its worker polls it), fixed to
    # production; everything else on elice-process, whose workers deploy into dev and staging
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    production = {"promote-production", "rollback-production", "health-check"}
    assert {name for name, pool in pools.items() if pool == "elice-production"} == production
    assert set(pools.values()) == {"elice-process", "elice-production"}
    for name in production:
        assert deployments[name]["parameters"]["environment"] == "production", name
    assert deployments["promote"]["parameters"]["environment"] == "staging"
    # The flow decides whether a run may ship (protected branch), not the deployment.
    assert deployments["ci"]["parameters"]["deliver"] is True
    # GitHub Actions passes the actor; nobody promotes as a default name.
    assert "promoted_by" not in deployments["promote"]["parameters"]
    assert deployments["nightly-rebuild"]["schedules"] == [
        {"cron": "0 3 * * *", "timezone": "Asia/Seoul"}
    ]
    assert deployments["health-check"]["schedules"] == [{"interval": 900}]
    # the scheduled check renews the namespace's pull secret before an ECR token lapses
    assert deployments["health-check"]["parameters"]["refresh_pull_secret"] is True


@pytest.mark.slow
def test_every_deployment_registers_with_its_schedule_and_pool() -> None:
    for pool in ("elice-process", "elice-production"):
        created = _prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
        assert created.returncode == 0, created.stdout + created.stderr
    deployed = _prefect("deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    expected = {d["name"]: d for d in spec["deployments"]}
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(expected) <= set(deployments)
        nightly = deployments["nightly-rebuild"]
        assert nightly.work_pool_name == "elice-process"
        assert nightly.parameters["no_cache"] is True
        assert nightly.parameters["all_services"] is True
        assert nightly.pull_steps == PULL
        [schedule] = nightly.schedules
        assert schedule.schedule.cron == "0 3 * * *"
        assert schedule.schedule.timezone == "Asia/Seoul"
        flows = {d.name: client.read_flow(d.flow_id).name for d in deployments.values()}
    assert flows["ci"] == "ci"
    assert flows["nightly-rebuild"] == "ci"
    assert flows["promote"] == flows["promote-production"] == "promote"
    assert flows["rollback"] == flows["rollback-production"] == "rollback"
    assert deployments["promote-production"].work_pool_name == "elice-production"
    assert flows["health-check"] == "health-check"

    # `cicd setup` registers the same deployments: right after `prefect deploy` it has
    # nothing to change in them.
    planned = [c for c in ensure_setup(dry_run=True) if c.kind == "deployment"]
    assert len(planned) == len(expected)
    assert {c.action for c in planned} == {"unchanged"}, planned


def test_bad_parameters_are_refused_before_a_run_exists() -> None:
    run = _prefect("deployment", "run", "ci/ci", "--param", "no_cache=not-a-bool")
    assert run.returncode != 0

"""Which environment a run acts on, and whether a worker's trust file lets it: pure decisions.

The workers that make them are exercised against a real server in
tests/stack/test_trusted_worker.py; here the decisions themselves, and the flows' own check
at their start.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from core.errors import ConfigError
from core.settings import Settings
from core.trust import TRUST_FILE_ENV, TrustRoots, write_trust_roots
from flows.health import health_check
from flows.promotion import promote, rollback
from tasks.deployment_check import (
    SET_WORKING_DIRECTORY,
    Declared,
    DeploymentFacts,
    Launch,
    environment_difference,
    flow_signature,
    launch_of,
    refuse_local_only,
    require_trusted_environment,
)

DEV_STAGING = TrustRoots(repository="/repo", environments=("dev", "staging"))
PRODUCTION = TrustRoots(repository="/repo", environments=("production",))
FLOW = """
from prefect import flow
SOME = "x"

@flow
def deploy(environment: str = "dev", *, wave: int = 2, note: str = SOME, when=None) -> None:
    pass

def check(environment: str, services: list[str] | None = None) -> None:
    pass

def elsewhere(services: list[str] = ["auth"]) -> None:
    pass
"""


def _declared(function: str, parameters: dict[str, Any] | None = None) -> Declared:
    names, defaults = flow_signature(FLOW, function)
    facts = DeploymentFacts(
        name=function,
        entrypoint=f"flows/x.py:{function}",
        pull_steps=[],
        job_variables={},
        parameters=parameters or {},
        work_pool="elice-process",
        work_queue="default",
    )
    return Declared(facts, names, defaults)


def test_the_flows_signature_with_its_literal_defaults() -> None:
    names, defaults = flow_signature(FLOW, "deploy")
    assert names == {"environment", "wave", "note", "when"}
    # a default that is not a literal (a name) is not known without running the code
    assert defaults == {"environment": "dev", "wave": 2, "when": None}
    assert flow_signature(FLOW, "check") == ({"environment", "services"}, {"services": None})
    with pytest.raises(ConfigError, match="no function 'missing'"):
        flow_signature(FLOW, "missing")


def test_the_effective_environment_is_the_runs_else_the_deployments_else_the_flows() -> None:
    flow_default = _declared("deploy")  # dev
    assert environment_difference(flow_default, {}, DEV_STAGING) is None
    assert environment_difference(flow_default, {}, PRODUCTION) == (
        "environment 'dev' is not one this worker deploys into (production)"
    )
    deployment_default = _declared("deploy", {"environment": "production"})
    assert environment_difference(deployment_default, {}, PRODUCTION) is None
    assert environment_difference(deployment_default, {}, DEV_STAGING) == (
        "environment 'production' is not one this worker deploys into (dev, staging)"
    )
    run = {"environment": "staging"}
    assert environment_difference(deployment_default, run, DEV_STAGING) is None
    assert environment_difference(deployment_default, run, PRODUCTION) is not None


def test_a_run_that_names_no_environment_or_no_name_is_refused() -> None:
    required = _declared("check")
    assert environment_difference(required, {}, DEV_STAGING) == "the run names no environment"
    assert environment_difference(required, {"environment": None}, DEV_STAGING) == (
        "environment null is not an environment's name"
    )
    assert environment_difference(required, {"environment": ["dev"]}, DEV_STAGING) == (
        'environment ["dev"] is not an environment\'s name'
    )
    # a flow without an environment parameter acts on none
    assert environment_difference(_declared("elsewhere"), {}, PRODUCTION) is None


def test_the_seed_aliases_stand_for_what_the_flows_resolve_them_to() -> None:
    required = _declared("check")
    assert environment_difference(required, {"environment": "prod"}, DEV_STAGING) == (
        "environment 'prod' is not one this worker deploys into (dev, staging)"
    )
    assert environment_difference(required, {"environment": "prod"}, PRODUCTION) is None
    assert environment_difference(required, {"environment": "stg"}, DEV_STAGING) is None
    assert environment_difference(required, {"environment": "stg"}, PRODUCTION) is not None


def test_a_flow_checks_its_workers_trust_file_only_where_there_is_one(tmp_path: Path) -> None:
    require_trusted_environment(Settings(), "production")  # not a worker's run: no check
    trust = write_trust_roots(tmp_path / "trust.yaml", DEV_STAGING)
    settings = Settings(trust_file=trust)
    require_trusted_environment(settings, "staging")
    with pytest.raises(ConfigError, match=r"environment 'production' is not one this worker"):
        require_trusted_environment(settings, "production")
    with pytest.raises(ConfigError, match=r"trust file .*missing\.yaml"):
        require_trusted_environment(Settings(trust_file=tmp_path / "missing.yaml"), "dev")


@pytest.mark.parametrize(
    "start",
    [
        lambda: promote.fn(environment="production", config_source="/nowhere.yaml"),
        lambda: rollback.fn(environment="production", config_source="/nowhere.yaml"),
        lambda: health_check.fn(environment="prod", config_source="/nowhere.yaml"),
    ],
    ids=["promote", "rollback", "health-check"],
)
def test_the_flows_refuse_an_environment_their_worker_may_not_deploy_into_first(
    start: Callable[[], object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that started a production run anyway (misconfigured): the flow refuses it
    before it reads anything (the configuration named here does not exist)."""
    trust = write_trust_roots(tmp_path / "trust.yaml", DEV_STAGING)
    monkeypatch.setenv(TRUST_FILE_ENV, str(trust))
    with pytest.raises(ConfigError, match=r"environment '(production|prod)' is not one") as info:
        start()
    assert str(trust) in str(info.value)


def test_a_worker_runs_the_declared_working_directory_and_entrypoint_itself(
    tmp_path: Path,
) -> None:
    pull = [{SET_WORKING_DIRECTORY: {"directory": "{{ $ELICE_REPO }}"}}]
    declared = _declared("deploy")
    declared = Declared(
        dataclasses.replace(declared.facts, pull_steps=pull, entrypoint="flows/x.py:deploy"),
        declared.allowed_parameters,
        declared.defaults,
    )
    launch = launch_of(declared, {"ELICE_REPO": str(tmp_path)})
    assert launch == Launch(tmp_path.resolve(), f"{tmp_path.resolve()}/flows/x.py:deploy")
    assert launch_of(declared, {}) is None  # the variable unset: nothing to set
    assert launch_of(declared, {"ELICE_REPO": str(tmp_path / "gone")}) is None
    script = [{"prefect.deployments.steps.run_shell_script": {"script": "touch /tmp/x"}}]
    other = Declared(dataclasses.replace(declared.facts, pull_steps=[*pull, *script]))
    assert launch_of(other, {"ELICE_REPO": str(tmp_path)}) is None


def test_a_workers_run_refuses_local_only_parameters_again_at_its_start(tmp_path: Path) -> None:
    """The run's parameters can be rewritten through the API after the worker's check."""
    worker = write_trust_roots(
        tmp_path / "worker.yaml", DEV_STAGING.model_copy(update={"config": "config/p.yaml"})
    )
    person = write_trust_roots(
        tmp_path / "person.yaml", DEV_STAGING.model_copy(update={"config": None})
    )
    refuse_local_only(Settings(trust_file=worker), {"repo": None, "config_source": None})
    with pytest.raises(ConfigError, match=r"parameters \['config_source', 'repo'\] serve local"):
        refuse_local_only(Settings(trust_file=worker), {"repo": "/x", "config_source": "/c.yaml"})
    refuse_local_only(Settings(trust_file=person), {"repo": "/x"})  # a person's machine
    refuse_local_only(Settings(), {"repo": "/x"})


def test_a_run_launched_as_the_worker_launches_it_never_runs_the_apis_pull_steps(
    tmp_path: Path,
) -> None:
    """The attack in the window between the worker's check and the run's start: the
    deployment's pull step rewritten to a script. Started the way the worker starts a run
    it verified (the declared directory as its working directory, the declared entrypoint
    in PREFECT__FLOW_ENTRYPOINT), Prefect's engine runs the declared flow and never reads
    the pull steps: the script does not run."""
    code = tmp_path / "code"
    code.mkdir()
    ran, marker = tmp_path / "ran", tmp_path / "pwned"
    (code / "probe.py").write_text(
        "from pathlib import Path\nfrom prefect import flow\n\n\n@flow\n"
        f"def probe() -> None:\n    Path({str(ran)!r}).write_text('declared')\n"
    )
    evil = [{"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}]
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("probe"),
            name=f"probe-{uuid.uuid4().hex[:6]}",
            entrypoint="probe.py:probe",
            pull_steps=evil,  # as the API holds it after the rewrite
        )
        run = client.create_flow_run_from_deployment(deployment_id)
    launch = Launch(code, f"{code}/probe.py:probe")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    env["PREFECT__FLOW_ENTRYPOINT"] = launch.entrypoint
    done = subprocess.run(
        [sys.executable, "-m", "prefect.engine", str(run.id)],
        cwd=launch.directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert ran.read_text() == "declared"
    assert not marker.exists()
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
        client.delete_deployment(deployment_id)
    assert state is not None
    assert state.is_completed()

"""Which environment a run acts on, and whether a worker's trust file lets it: pure decisions.

The workers that make them are exercised against a real server in
tests/stack/test_trusted_worker.py; here the decisions themselves, and the flows' own check
at their start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from core.settings import Settings
from core.trust import TRUST_FILE_ENV, TrustRoots, write_trust_roots
from flows.health import health_check
from flows.promotion import promote, rollback
from tasks.deployment_check import (
    Declared,
    DeploymentFacts,
    environment_difference,
    flow_signature,
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

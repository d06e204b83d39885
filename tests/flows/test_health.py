"""The health-check flow and `cicd health`, against real services.

The service `probe` of this module's configuration is a real servicekit app (libs/servicekit,
served by uvicorn) per environment, on a free loopback port; each environment's port offset
points the docker target's address at its process. The ledger lives in a temporary state
directory. The last test deploys the session's real `course` image as a container on the
local stack and checks it through `cicd health prod --json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from blocks.config import load_config
from blocks.notifications import PAGERDUTY_BLOCK, SLACK_BLOCK, PagerDutyService, SlackChannel
from blocks.stack import StackInfo
from cicd.cli import app
from core.errors import ConfigError, EnvironmentUnhealthy, HealthCheckFailed
from core.records import HealthReport, ImageRef
from flows.health import health_check
from tasks.deploy.docker import DockerDeployer, container_name
from tasks.health import NOT_DEPLOYED
from tasks.releases import ReleaseRecord
from tests.ledgers import current_ledger
from tests.plugins.receivers import Receiver
from tests.tasks.servicekit_server import DIGEST_A, DIGEST_B, servicekit_server

runner = CliRunner()
JSON_FIELDS = {"service", "url", "ok", "attempts", "seconds", "failures"}


@dataclass
class Setup:
    config: str
    urls: dict[str, str]  # environment -> base URL of its `probe` process


def environment(name: str, offset: int) -> dict[str, object]:
    return {
        "name": name,
        "namespace": f"hc-{name}",
        "replicas": {"min": 1, "max": 1},
        "log_level": "INFO",
        "storage": "minio",
        "local_port_offset": offset,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """dev (nothing recorded), staging and production each serving `probe` on DIGEST_A."""
    folder = tmp_path_factory.mktemp("health")
    with (
        pytest.MonkeyPatch.context() as patch,
        servicekit_server(folder / "stg", {"ENVIRONMENT": "staging"}) as stg,
        servicekit_server(folder / "prod", {"ENVIRONMENT": "production"}) as prod,
    ):
        patch.setenv("ELICE_STATE_DIR", str(folder / "state"))
        urls = {"staging": stg, "production": prod}
        ports = {env: int(url.rsplit(":", 1)[1]) for env, url in urls.items()}
        base = max(1024, max(ports.values()) - 40000)  # the service's own port
        data = {
            "services": [
                {"name": "probe", "port": base},
                {"name": "absent", "port": base + 1},
            ],
            "environments": [
                environment("dev", 0),
                environment("staging", ports["staging"] - base),
                environment("production", ports["production"] - base),
            ],
        }
        config = folder / "pipeline.yaml"
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
        for env in ("staging", "production"):
            record(env, DIGEST_A)
        yield Setup(config=str(config), urls=urls)


def record(env: str, digest: str, service: str = "probe") -> None:
    image = ImageRef(service=service, repository=f"127.0.0.1:5000/elice/{service}", digest=digest)
    current_ledger().record_deploy(
        env,
        ReleaseRecord(
            service=service, environment=env, image=image, release_id="r-test", verified=True
        ),
    )


def test_an_environment_with_nothing_recorded_fails_nothing_deployed(setup: Setup) -> None:
    state = health_check(environment="dev", config_source=setup.config, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, EnvironmentUnhealthy)
    assert isinstance(error, HealthCheckFailed)
    assert "dev: nothing deployed" in str(error)
    assert error.report == HealthReport(environment="dev", results=[])


@pytest.mark.stack
def test_cicd_health_of_an_empty_environment_exits_1_nothing_deployed(setup: Setup) -> None:
    result = runner.invoke(app, ["health", "dev", "--config", setup.config])
    assert result.exit_code == 1, result.output
    assert "nothing deployed" in result.output
    assert "Traceback" not in result.output

    as_json = runner.invoke(app, ["health", "dev", "--json", "--config", setup.config])
    assert as_json.exit_code == 1, as_json.output
    report = json.loads(as_json.stdout)
    assert report["environment"] == "dev"
    assert report["ok"] is False
    assert report["services"] == []
    assert "nothing deployed" in report["message"]


def test_seed_aliases_stg_and_prod_check_staging_and_production(setup: Setup) -> None:
    for alias, name in (("stg", "staging"), ("prod", "production")):
        state = health_check(environment=alias, config_source=setup.config, return_state=True)
        assert state.is_completed(), state.message
        report = state.result()
        assert report.environment == name
        assert [(r.service, r.url, r.ok) for r in report.results] == [
            ("probe", setup.urls[name], True)
        ]
        assert report.results[0].version["environment"] == name  # its own process answered


def test_environment_names_and_seed_aliases(setup: Setup, tmp_path: Path) -> None:
    cfg = load_config(setup.config)
    assert cfg.environments.resolve("dev").name == "dev"
    assert cfg.environments.resolve("stg").name == "staging"
    assert cfg.environments.resolve("production").name == "production"
    with pytest.raises(ConfigError, match=r"unknown environment 'qa'.*aliases: stg = staging"):
        cfg.environments.resolve("qa")
    # an environment really called `prod` is that one, not production
    data = yaml.safe_load(Path(setup.config).read_text())
    data["environments"].append(environment("prod", 39000))
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump(data))
    assert load_config(str(own)).environments.resolve("prod").name == "prod"


@pytest.mark.stack
def test_cicd_health_json_of_a_healthy_environment(setup: Setup) -> None:
    result = runner.invoke(app, ["health", "prod", "--json", "--config", setup.config])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["environment"] == "production"
    assert report["ok"] is True
    [probe] = report["services"]
    assert JSON_FIELDS <= set(probe)
    assert probe["service"] == "probe"
    assert probe["url"] == setup.urls["production"]
    assert probe["ok"] is True
    assert probe["attempts"] >= 1
    assert isinstance(probe["seconds"], float)
    assert probe["failures"] == []

    table = runner.invoke(app, ["health", "prod", "--config", setup.config])
    assert table.exit_code == 0, table.output
    assert "production: 1 services healthy" in table.output


@pytest.mark.stack
def test_an_unhealthy_service_exits_1_with_its_failures(setup: Setup) -> None:
    record("staging", DIGEST_B)  # the process serves DIGEST_A
    try:
        args = ["health", "stg", "--json", "--deadline", "1", "--config", setup.config]
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        report = json.loads(result.stdout)
        assert report["environment"] == "staging"
        assert report["ok"] is False
        [probe] = report["services"]
        assert probe["ok"] is False
        assert probe["attempts"] >= 2
        assert probe["failures"] == [f"/version: digest {DIGEST_A}, expected {DIGEST_B}"]
        assert "staging: unhealthy: probe" in report["message"]

        plain = runner.invoke(app, ["health", "stg", "--deadline", "1", "--config", setup.config])
        assert plain.exit_code == 1
        assert "FAIL" in plain.output
        assert f"expected {DIGEST_B}" in plain.output
    finally:
        record("staging", DIGEST_A)


def test_a_named_service_without_a_release_fails(setup: Setup) -> None:
    state = health_check(
        environment="production",
        services=["absent"],
        config_source=setup.config,
        return_state=True,
    )
    assert state.is_failed()
    assert "production: nothing deployed" in str(state.result(raise_on_failure=False))

    state = health_check(
        environment="production",
        services=["probe", "absent"],
        config_source=setup.config,
        return_state=True,
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, EnvironmentUnhealthy)
    assert [(r.service, r.ok, r.failures) for r in error.report.results] == [
        ("probe", True, []),
        ("absent", False, [NOT_DEPLOYED]),
    ]


def test_bad_input_exits_2_before_anything_starts(setup: Setup) -> None:
    for args in (
        ["health", "qa"],
        ["health", "stg", "--services", "probe,nosuch"],
        ["health", "stg", "--deadline", "0"],
    ):
        result = runner.invoke(app, [*args, "--config", setup.config])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


# --- a real container on the local stack ---------------------------------------------------

ENV_OFFSET = 36500  # course (8004) answers on 127.0.0.1:44504


@pytest.mark.stack
def test_cicd_health_of_a_real_container_by_alias(
    tmp_path: Path,
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    monkeypatch.setenv("ELICE_STATE_DIR", str(tmp_path / "state"))
    data = yaml.safe_load((Path(__file__).parents[2] / "config" / "pipeline.yaml").read_text())
    data["environments"] = [environment("production", ENV_OFFSET)]
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(str(config))
    env, course = cfg.environment("production"), cfg.service("course")
    image = pushed_image.model_copy(update={"service": "course"})
    name = container_name("elice", "production", "course")
    try:
        deployed = DockerDeployer().deploy(env, course, image, deadline_s=90)
        record_container = ReleaseRecord(
            service="course", environment="production", image=image, release_id="r-c"
        )
        current_ledger().record_deploy("production", record_container)
        result = runner.invoke(app, ["health", "prod", "--json", "--config", str(config)])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["ok"] is True
        assert [(s["service"], s["url"], s["ok"]) for s in report["services"]] == [
            ("course", deployed.address, True)
        ]
    finally:
        for suffix in ("", "-next"):
            try:
                docker_client.containers.get(name + suffix).remove(force=True)
            except docker.errors.NotFound:
                pass


def test_production_unhealthy_pages_and_healthy_again_resolves(
    setup: Setup, running_receiver: Receiver
) -> None:
    SlackChannel(
        bot_token=SecretStr("xoxb-health"), channel="#ops", base_url=running_receiver.slack_base_url
    ).save(SLACK_BLOCK, overwrite=True)
    PagerDutyService(
        routing_key=SecretStr("pd-health-key"), events_url=running_receiver.pagerduty_url
    ).save(PAGERDUTY_BLOCK, overwrite=True)
    try:
        record("production", DIGEST_B)  # the process serves DIGEST_A: unhealthy
        failed = health_check(
            environment="prod", deadline_s=1, config_source=setup.config, return_state=True
        )
        assert failed.is_failed()
        record("production", DIGEST_A)
        healthy = health_check(environment="prod", config_source=setup.config, return_state=True)
        assert healthy.is_completed(), healthy.message
        staging = health_check(environment="stg", config_source=setup.config, return_state=True)
        assert staging.is_completed()
    finally:
        SlackChannel.delete(SLACK_BLOCK)
        PagerDutyService.delete(PAGERDUTY_BLOCK)
    events = [r.payload() for r in running_receiver.requests_to("/v2/enqueue")]
    assert [e["event_action"] for e in events] == ["trigger", "resolve"]
    assert events[0]["dedup_key"] == events[1]["dedup_key"]
    assert "production" in events[0]["payload"]["summary"]
    slack = running_receiver.requests_to("chat.postMessage")
    assert len(slack) == 1  # the failure; healthy checks do not talk to Slack
    assert "expected " + DIGEST_B in json.dumps(slack[0].payload())

"""The local stack's Prometheus, Alertmanager and alert log as parts of the stack
(the alert log itself: tests/daemons/test_alert_log.py).

The end-to-end test runs them through `ensure_stack` in a fresh stack directory on the
session's engine, with a configuration of one environment of its own ("monitored", port
offset 34000: course answers on 127.0.0.1:42004, which no other test uses) and a Slack
block saved on the session's Prefect server pointing at a recording receiver. It deploys
one real service container with the docker target, stops it, and waits for ServiceDown.
"""

from __future__ import annotations

import contextlib
import json
import re
import stat
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from typer.testing import CliRunner

from blocks.config import PipelineConfig, load_config
from blocks.notifications import (
    PAGERDUTY_BLOCK,
    SLACK_BLOCK,
    PagerDutyService,
    SlackChannel,
    load_pagerduty_service,
)
from blocks.stack import StackInfo, load_stack_info
from cicd.stack_cli import app
from core.records import ImageRef
from stack.control import ensure_stack, stack_status, stop_stack
from stack.monitoring import alert_log_file
from stack.monitoring_config import AlertReceivers, saved_receivers, write_alertmanager_config
from stack.steps import StackStep
from tasks.deploy.docker import DockerDeployer, container_name
from tests.monitoring.tools import REPO, get_json, post_json, run, tool, wait_for
from tests.plugins.receivers import Receiver

ENV_NAME = "monitored"
OFFSET = 34000
PREFIX = "elice-mon"
SERVICE = "course"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- receivers and their secrets --------------------------------------------------------


def test_configured_receivers_keep_their_secrets_in_private_files(tmp_path: Path) -> None:
    token, key = "xoxb-secret-bot-token", "pd-secret-routing-key"
    receivers = AlertReceivers(
        slack=SlackChannel(bot_token=token, channel="#ops", base_url="http://127.0.0.1:1/api/"),
        pagerduty=PagerDutyService(routing_key=key, events_url="http://127.0.0.1:1/v2/enqueue"),
    )
    log_url = "http://127.0.0.1:1/alerts"
    config, changed = write_alertmanager_config(tmp_path, receivers, log_url)
    assert changed
    secrets = tmp_path / "secrets"
    assert _mode(secrets) == 0o700
    assert sorted(p.name for p in secrets.iterdir()) == ["pagerduty-routing-key", "slack-bot-token"]
    assert all(_mode(p) == 0o600 for p in secrets.iterdir())
    assert (secrets / "slack-bot-token").read_text() == token + "\n"
    text = config.read_text()
    assert token not in text
    assert key not in text
    assert log_url not in text  # both receivers configured: nothing goes to the log
    assert "SUCCESS" in run(tool("amtool"), "check-config", config).stdout
    loaded = {r["name"]: r for r in yaml.safe_load(text)["receivers"]}
    (slack,) = loaded["slack"]["slack_configs"]
    assert slack["api_url"] == "http://127.0.0.1:1/api/chat.postMessage"
    assert slack["channel"] == "#ops"
    assert slack["http_config"]["authorization"]["credentials_file"] == str(
        secrets / "slack-bot-token"
    )
    (pagerduty,) = loaded["pagerduty"]["pagerduty_configs"]
    assert pagerduty["routing_key_file"] == str(secrets / "pagerduty-routing-key")
    assert pagerduty["url"] == "http://127.0.0.1:1/v2/enqueue"
    routes = receivers.routes(tmp_path / "alerts.log")
    assert routes == (
        f"production criticals -> PagerDuty (block {PAGERDUTY_BLOCK}); "
        f"other alerts -> Slack #ops (block {SLACK_BLOCK})"
    )
    assert write_alertmanager_config(tmp_path, receivers, log_url) == (config, False)

    # Neither configured any more: secrets removed, everything to the log's webhook.
    config, changed = write_alertmanager_config(tmp_path, AlertReceivers(), log_url)
    assert changed
    assert list(secrets.iterdir()) == []
    loaded = {r["name"]: r for r in yaml.safe_load(config.read_text())["receivers"]}
    for name in ("slack", "pagerduty"):
        assert loaded[name] == {
            "name": name,
            "webhook_configs": [{"url": log_url, "send_resolved": True}],
        }
    assert "SUCCESS" in run(tool("amtool"), "check-config", config).stdout
    assert AlertReceivers().routes(Path("/x/alerts.log")) == "all alerts -> the log /x/alerts.log"


def test_saved_receivers_are_the_saved_blocks() -> None:
    slack_name, pagerduty_name = "test-monitoring-slack", "test-monitoring-pagerduty"
    assert saved_receivers(None, slack_name, pagerduty_name) == AlertReceivers()
    SlackChannel(webhook_url="https://hooks.slack.invalid/services/T/B/X").save(
        slack_name, overwrite=True
    )
    PagerDutyService(routing_key="pd-key").save(pagerduty_name, overwrite=True)
    try:
        found = saved_receivers(None, slack_name, pagerduty_name)
        assert found.slack is not None
        assert found.slack.webhook_url is not None
        assert found.slack.webhook_url.get_secret_value().endswith("/T/B/X")
        assert found.pagerduty is not None
        assert found.pagerduty.routing_key.get_secret_value() == "pd-key"
        assert found.note == ""
    finally:
        SlackChannel.delete(slack_name)
        PagerDutyService.delete(pagerduty_name)


# --- end to end -------------------------------------------------------------------------


def _config_file(folder: Path) -> Path:
    data = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text(encoding="utf-8"))
    data["services"] = [s for s in data["services"] if s["name"] == SERVICE]
    data["environments"] = [
        {
            "name": ENV_NAME,
            "namespace": f"elice-{ENV_NAME}",
            "replicas": {"min": 1, "max": 1},
            "log_level": "INFO",
            "storage": "minio",
            "local_port_offset": OFFSET,
        }
    ]
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def slack_block(running_receiver: Receiver) -> Iterator[None]:
    """The saved Slack block posting to the recording receiver's incoming webhook."""
    assert load_pagerduty_service() is None, "a PagerDuty block was left saved"
    SlackChannel(webhook_url=running_receiver.webhook_url).save(SLACK_BLOCK, overwrite=True)
    try:
        yield
    finally:
        SlackChannel.delete(SLACK_BLOCK)


def _service_down(prometheus: str) -> list[dict[str, Any]]:
    alerts = get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    return [
        a
        for a in alerts
        if a["labels"]["alertname"] == "ServiceDown" and a["labels"]["environment"] == ENV_NAME
    ]


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.usefixtures("slack_block")
def test_a_stopped_service_container_alerts_through_the_stacks_monitoring(
    stack: StackInfo,
    docker_client: docker.DockerClient,
    pushed_image: ImageRef,
    running_receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "stack"
    config_file = _config_file(tmp_path)
    monkeypatch.setenv("DOCKER_HOST", stack.docker_host)
    monkeypatch.setenv("ELICE_STACK_DIR", str(root))
    monkeypatch.setenv("ELICE_CONFIG", str(config_file))
    cfg: PipelineConfig = load_config(str(config_file))
    env, service = cfg.environment(ENV_NAME), cfg.service(SERVICE)
    image = pushed_image.model_copy(update={"service": SERVICE})
    name = container_name(PREFIX, ENV_NAME, SERVICE)
    deployer = DockerDeployer(stack.docker_host, PREFIX)
    try:
        deployed = deployer.deploy(env, service, image, deadline_s=90)
        assert deployed.address == f"http://127.0.0.1:{service.port + OFFSET}"

        steps: list[StackStep] = []
        info = ensure_stack(monitoring=True, root=root, progress=steps.append)
        assert info.prometheus_url
        assert info.alertmanager_url
        assert load_stack_info(root) == info
        lines = [s.line() for s in steps]
        assert any(re.fullmatch(r"prometheus: ready in \d+\.\ds", line) for line in lines), lines
        assert (
            "alertmanager: production criticals -> the log "
            f"{alert_log_file(root)}; other alerts -> Slack (incoming webhook of block "
            f"{SLACK_BLOCK})"
        ) in lines
        assert f"prometheus: scraping 1 services in {ENV_NAME}" in lines
        targets = json.loads((root / "monitoring" / "targets.json").read_text())
        assert targets == [
            {
                "targets": [f"127.0.0.1:{service.port + OFFSET}"],
                "labels": {
                    "service": SERVICE,
                    "environment": ENV_NAME,
                    "namespace": f"elice-{ENV_NAME}",
                },
            }
        ]
        secret = root / "monitoring" / "secrets" / "slack-webhook-url"
        assert _mode(secret) == 0o600
        am_yml = (root / "monitoring" / "alertmanager.yml").read_text()
        assert running_receiver.webhook_url not in am_yml
        prometheus = info.prometheus_url

        def scraped() -> bool:
            query = urllib.parse.quote(f'up{{service="{SERVICE}",environment="{ENV_NAME}"}}')
            result = get_json(f"{prometheus}/api/v1/query?query={query}")["data"]["result"]
            return bool(result) and result[0]["value"][1] == "1"

        wait_for("Prometheus scraping the deployed service", scraped, timeout=60)

        # Running and unchanged: reused, nothing restarted.
        pids = {p.stem: p.read_text() for p in (root / "pids").glob("*.pid")}
        again: list[StackStep] = []
        assert ensure_stack(monitoring=True, root=root, progress=again.append) == info
        assert {p.stem: p.read_text() for p in (root / "pids").glob("*.pid")} == pids
        assert not [s for s in again if s.state == "start"], again
        parts = {p.name: (p.state, p.address) for p in stack_status(root)}
        assert parts["prometheus"] == ("running", info.prometheus_url)
        assert parts["alertmanager"] == ("running", info.alertmanager_url)
        assert parts["alert-log"] == ("running", str(alert_log_file(root)))
        status = CliRunner().invoke(app, ["status"])
        assert status.exit_code == 0, status.output
        assert info.prometheus_url in status.output
        assert info.alertmanager_url in status.output

        down_at = time.monotonic()
        docker_client.containers.get(name).stop(timeout=5)

        # A production critical, with no PagerDuty configured, goes to the log.
        post_json(
            f"{info.alertmanager_url}/api/v2/alerts",
            [
                {
                    "labels": {
                        "alertname": "StackCheck",
                        "severity": "critical",
                        "environment": "production",
                        "service": "probe",
                    },
                    "annotations": {"summary": "routing check"},
                }
            ],
        )
        # Both escalation steps wait: the warning (1m) and the critical (5m).
        pending = wait_for(
            "ServiceDown pending",
            lambda: len(_service_down(prometheus)) == 2 and _service_down(prometheus),
            timeout=45,
        )
        assert {a["labels"]["severity"] for a in pending} == {"warning", "critical"}
        assert {a["state"] for a in pending} == {"pending"}, "fired before its `for:`"
        assert time.monotonic() - down_at < 60
        logged = wait_for(
            "the production critical in the alert log",
            lambda: [e for e in _log_lines(alert_log_file(root)) if e["alertname"] == "StackCheck"],
            timeout=60,
        )
        assert logged[0]["receiver"] == "pagerduty"
        assert not running_receiver.requests_to("/XXXX"), "reached Slack before ServiceDown fired"

        def delivered() -> list[Any]:
            return [r for r in running_receiver.requests_to("/XXXX") if b"ServiceDown" in r.body]

        (message, *_) = wait_for("ServiceDown at the Slack receiver", delivered, timeout=180)
        after = time.monotonic() - down_at
        assert after >= 60, f"ServiceDown reached Slack {after:.0f}s after the stop"
        text = message.body.decode()
        assert f"{SERVICE} is down in {ENV_NAME}" in text
        assert "warning" in text
        assert not [e for e in _log_lines(alert_log_file(root)) if e["alertname"] == "ServiceDown"]
    finally:
        stopped = stop_stack(root)
        for suffix in ("", "-next"):
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(name + suffix).remove(force=True)
    assert sorted(stopped) == ["alert-log", "alertmanager", "prometheus", "registry"]
    states = {p.name: p.state for p in stack_status(root)}
    assert states["prometheus"] == states["alertmanager"] == states["alert-log"] == "stopped"

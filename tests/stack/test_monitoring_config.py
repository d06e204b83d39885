"""The local stack's monitoring configuration: every docker-target service of every
environment as a target, the project's rules, and a stopped service's ServiceDown alert
pending in the real Prometheus at both escalation steps. Its delivery after the 1m `for:`
(to Slack, not the production log) is shown once, through the stack's own Prometheus and
Alertmanager (tests/stack/test_monitoring.py): waiting out that minute here as well added
a minute to the suite and nothing the stack's test does not show."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.config import PipelineConfig
from stack.monitoring_config import alertmanager_config, prometheus_config, scrape_targets
from tests.monitoring.tools import (
    free_port,
    get_json,
    run,
    start_server,
    stop_server,
    tool,
    wait_for,
)
from tests.plugins.receivers import Receiver


def test_every_docker_target_service_of_every_environment_is_a_target(
    config: PipelineConfig,
) -> None:
    groups = scrape_targets(config)
    envs = config.environments.environments
    assert len(groups) == len(envs) * len(config.catalog.services)
    seen = {(g["labels"]["environment"], g["labels"]["service"]): g["targets"] for g in groups}
    for env in envs:
        for service in config.catalog.services:
            assert seen[(env.name, service.name)] == [f"127.0.0.1:{env.host_port(service.port)}"]
    assert len({t for g in groups for t in g["targets"]}) == len(groups), "ports collide"


def test_generated_configs_pass_promtool_and_amtool(tmp_path: Path, config: PipelineConfig) -> None:
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(scrape_targets(config)), encoding="utf-8")
    prom = tmp_path / "prometheus.yml"
    prom.write_text(yaml.safe_dump(prometheus_config(targets, "127.0.0.1:9093")), encoding="utf-8")
    proc = run(tool("promtool"), "check", "config", prom)
    assert "alerts.yml" in proc.stdout
    for slack, pagerduty in ((None, None), (tmp_path / "slack-url", tmp_path / "pd-key")):
        for secret in (slack, pagerduty):
            if secret is not None:
                secret.write_text("https://hooks.slack.invalid/x\n", encoding="utf-8")
        am = tmp_path / "alertmanager.yml"
        generated = alertmanager_config(
            "http://127.0.0.1:1/alerts", slack_webhook_file=slack, pagerduty_key_file=pagerduty
        )
        am.write_text(yaml.safe_dump(generated), encoding="utf-8")
        assert "SUCCESS" in run(tool("amtool"), "check-config", am).stdout
        routed = run(
            tool("amtool"), "config", "routes", "test", f"--config.file={am}",
            "severity=critical", "environment=production",
        )  # fmt: skip
        assert routed.stdout.strip() == "pagerduty"


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = (
            b"# TYPE http_requests_total counter\n"
            b'http_requests_total{service="course",method="GET",path="/",status="200"} 1\n'
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_a_stopped_service_raises_service_down_pending_at_both_steps(
    tmp_path: Path, running_receiver: Receiver
) -> None:
    """Real Prometheus (the project's rules, its alerts sent to a real Alertmanager); one
    service, then stopped."""
    port = free_port()
    service = ThreadingHTTPServer(("127.0.0.1", port), _Metrics)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    targets = tmp_path / "targets.json"
    groups = [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {"service": "course", "environment": "staging", "namespace": "x"},
        }
    ]
    targets.write_text(json.dumps(groups), encoding="utf-8")

    slack_url = tmp_path / "slack-webhook-url"
    slack_url.write_text(running_receiver.webhook_url + "\n", encoding="utf-8")
    am_web = f"127.0.0.1:{free_port()}"
    am_yml = tmp_path / "alertmanager.yml"
    am_yml.write_text(
        yaml.safe_dump(
            alertmanager_config(
                f"{running_receiver.url}/alert-log",
                slack_webhook_file=slack_url,
                group_wait="0s",
            )
        ),
        encoding="utf-8",
    )
    prom_web = f"127.0.0.1:{free_port()}"
    prom_yml = tmp_path / "prometheus.yml"
    prom_yml.write_text(
        yaml.safe_dump(
            prometheus_config(targets, am_web, scrape_interval="1s", evaluation_interval="1s")
        ),
        encoding="utf-8",
    )
    procs = []
    try:
        procs.append(
            start_server(
                [
                    tool("prometheus-alertmanager"),
                    f"--config.file={am_yml}",
                    f"--storage.path={tmp_path / 'am'}",
                    f"--web.listen-address={am_web}",
                    "--cluster.listen-address=",
                ],
                f"http://{am_web}/-/ready",
                tmp_path / "alertmanager.log",
            )
        )
        procs.append(
            start_server(
                [
                    tool("prometheus"),
                    f"--config.file={prom_yml}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={prom_web}",
                ],
                f"http://{prom_web}/-/ready",
                tmp_path / "prometheus.log",
            )
        )

        def up() -> list[Any]:
            q = f"http://{prom_web}/api/v1/query?query=up%3D%3D1"
            return list(get_json(q)["data"]["result"])

        (series,) = wait_for("the service scraped", up, timeout=30)
        assert series["metric"]["service"] == "course"
        assert series["metric"]["environment"] == "staging"

        service.shutdown()
        service.server_close()

        def pending() -> list[Any]:
            alerts = get_json(f"http://{prom_web}/api/v1/alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "ServiceDown"]

        # Both escalation steps wait: the warning (1m) and the critical (5m).
        alerts = wait_for("ServiceDown pending", lambda: len(pending()) == 2 and pending())
        assert {a["labels"]["severity"] for a in alerts} == {"warning", "critical"}
        assert {a["state"] for a in alerts} == {"pending"}, "fired before its `for:`"
        assert {a["labels"]["environment"] for a in alerts} == {"staging"}
        sent = [r for r in running_receiver.requests if b"ServiceDown" in r.body]
        assert not sent, "a pending alert reached a receiver"
    finally:
        for proc in reversed(procs):
            stop_server(proc)
        service.server_close()

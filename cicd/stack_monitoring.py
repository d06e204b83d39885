"""Configuration of the local stack's Prometheus and Alertmanager, from the pipeline's.

The docker deploy target publishes each service of each environment on
127.0.0.1:<env.host_port(service.port)>; `scrape_targets` lists them as file-based
discovery groups labelled `service` and `environment` (what the Kubernetes job's relabeling
produces), so the project's own rules (monitoring/prometheus/rules) apply unchanged.
`alertmanager_config` keeps the project's routes and inhibitions and swaps the receivers:
a configured Slack channel / PagerDuty service, else a webhook that writes alerts to a log.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from blocks.config import PipelineConfig

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
SERVICES_JOB = "elice-services"


def scrape_targets(config: PipelineConfig, host: str = "127.0.0.1") -> list[dict[str, Any]]:
    """One file_sd group per environment and service, labelled as the cluster's job labels."""
    return [
        {
            "targets": [f"{host}:{env.host_port(service.port)}"],
            "labels": {
                "service": service.name,
                "environment": env.name,
                "namespace": env.namespace,
            },
        }
        for env in config.environments.environments
        for service in config.catalog.services
    ]


def prometheus_config(
    targets_file: Path,
    alertmanager: str,
    *,
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
    rule_files: list[Path] | None = None,
) -> dict[str, Any]:
    """The project's Prometheus configuration for the local stack.

    Same job name, rules and alerting as monitoring/prometheus/prometheus.yml; the services
    come from `targets_file` instead of Kubernetes discovery (no cluster here), and the
    Kubernetes-only jobs (cAdvisor, kubelet, kube-state-metrics) are left out.
    """
    source = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    (services,) = [j for j in source["scrape_configs"] if j["job_name"] == SERVICES_JOB]
    rules = rule_files or [PROMETHEUS_YML.parent / r for r in source["rule_files"]]
    return {
        "global": {
            **source["global"],
            "scrape_interval": scrape_interval,
            "scrape_timeout": min(scrape_interval, source["global"]["scrape_timeout"], key=_secs),
            "evaluation_interval": evaluation_interval,
            "external_labels": {"cluster": "local-stack"},
        },
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "rule_files": [str(r) for r in rules],
        "scrape_configs": [
            {
                "job_name": SERVICES_JOB,
                "metrics_path": services["metrics_path"],
                "honor_labels": services["honor_labels"],
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "30s"}],
            }
        ],
    }


def _secs(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit):
            return float(duration.removesuffix(unit)) * units[unit]
    return float(duration)


def alertmanager_config(
    log_webhook_url: str,
    *,
    slack_webhook_file: Path | None = None,
    pagerduty_key_file: Path | None = None,
    pagerduty_url: str | None = None,
    group_wait: str | None = None,
) -> dict[str, Any]:
    """The project's Alertmanager routes with local receivers.

    `slack` posts to the configured incoming webhook (a file holding its URL), else to the
    log; `pagerduty` pages through the configured service (a file holding the routing key),
    else to the log. Secrets stay in files, as in the cluster.
    """
    config: dict[str, Any] = copy.deepcopy(
        yaml.safe_load(ALERTMANAGER_YML.read_text(encoding="utf-8"))
    )
    if group_wait is not None:
        config["route"]["group_wait"] = group_wait
        for route in config["route"].get("routes", []):
            route["group_wait"] = group_wait
    log = [{"url": log_webhook_url, "send_resolved": True}]
    receivers = {r["name"]: r for r in config["receivers"]}
    slack = receivers["slack"]
    if slack_webhook_file is None:
        receivers["slack"] = {"name": "slack", "webhook_configs": log}
    else:
        for entry in slack["slack_configs"]:
            entry["api_url_file"] = str(slack_webhook_file)
    pagerduty = receivers["pagerduty"]
    if pagerduty_key_file is None:
        receivers["pagerduty"] = {"name": "pagerduty", "webhook_configs": log}
    else:
        for entry in pagerduty["pagerduty_configs"]:
            entry["routing_key_file"] = str(pagerduty_key_file)
            if pagerduty_url:
                entry["url"] = pagerduty_url
    config["receivers"] = list(receivers.values())
    return config

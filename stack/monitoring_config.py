"""Configuration of the local stack's Prometheus and Alertmanager, from the pipeline's.

The docker deploy target publishes each service of each environment on
127.0.0.1:<env.host_port(service.port)>; `scrape_targets` lists them as file-based
discovery groups labelled `service` and `environment` (what the Kubernetes job's relabeling
produces), so the project's own rules (monitoring/prometheus/rules) apply unchanged.
`alertmanager_config` keeps the project's routes and inhibitions and swaps the receivers:
a configured Slack channel / PagerDuty service, else a webhook that writes alerts to a log.

`stack/monitoring.py` runs them as parts of the local stack: `AlertReceivers` are the saved Slack /
PagerDuty blocks (`saved_receivers`), `write_local_config` writes everything the two servers
read into `<stack dir>/monitoring/` (secrets in files of mode 0600, never in the configs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from blocks.config import PipelineConfig, load_config
from blocks.notifications import (
    PAGERDUTY_BLOCK,
    SLACK_BLOCK,
    PagerDutyService,
    SlackChannel,
    load_pagerduty_service,
    load_slack_channel,
)
from blocks.stack import GREEN_TARGETS

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
    green_targets: Path | None = None,
) -> dict[str, Any]:
    """The project's Prometheus configuration for the local stack.

    Same job name, rules and alerting as monitoring/prometheus/prometheus.yml; the services
    come from `targets_file` instead of Kubernetes discovery (no cluster here), and the
    Kubernetes-only jobs (cAdvisor, kubelet, kube-state-metrics) are left out. The green
    containers of a blue-green promotion come from the files the deployer writes into
    `green_targets` (`*.json`, labelled `environment: <env>-green`), while they run.
    """
    files = [str(targets_file)]
    if green_targets is not None:
        files.append(str(green_targets / "*.json"))
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
                "file_sd_configs": [{"files": files, "refresh_interval": "30s"}],
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
    slack_token_file: Path | None = None,
    slack_api_url: str | None = None,
    slack_channel: str | None = None,
    pagerduty_key_file: Path | None = None,
    pagerduty_url: str | None = None,
    group_wait: str | None = None,
) -> dict[str, Any]:
    """The project's Alertmanager routes with local receivers.

    `slack` posts to the configured incoming webhook (a file holding its URL), or with a
    bot token (a file) to `slack_api_url` (chat.postMessage) in `slack_channel`, else to the
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
    if slack_webhook_file is not None:
        for entry in slack["slack_configs"]:
            entry["api_url_file"] = str(slack_webhook_file)
    elif slack_token_file is not None and slack_api_url and slack_channel:
        for entry in slack["slack_configs"]:
            entry.pop("api_url_file", None)
            entry["api_url"] = slack_api_url
            entry["channel"] = slack_channel
            entry["http_config"] = {"authorization": {"credentials_file": str(slack_token_file)}}
    else:
        receivers["slack"] = {"name": "slack", "webhook_configs": log}
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


# --- the local stack's files -----------------------------------------------------------------


@dataclass(frozen=True)
class AlertReceivers:
    """Where the local Alertmanager sends: the configured Slack / PagerDuty, else the log."""

    slack: SlackChannel | None = None
    pagerduty: PagerDutyService | None = None
    note: str = ""  # why the saved blocks were not read, when they were not

    def routes(self, alert_log: Path) -> str:
        """The routes in words, e.g. `production criticals -> PagerDuty (...); other alerts
        -> the log ...`."""
        log = f"the log {alert_log}"
        if self.slack is None:
            slack = log
        elif self.slack.webhook_url is not None:
            slack = f"Slack (incoming webhook of block {SLACK_BLOCK})"
        else:
            slack = f"Slack {self.slack.channel} (block {SLACK_BLOCK})"
        pagerduty = f"PagerDuty (block {PAGERDUTY_BLOCK})" if self.pagerduty else log
        if slack == pagerduty:
            return f"all alerts -> {log}"
        return f"production criticals -> {pagerduty}; other alerts -> {slack}"


def _prefect_settings(api_url: str | None) -> contextlib.AbstractContextManager[Any]:
    from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: PLC0415

    if api_url is None:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: api_url})


def prefect_api(api_url: str | None) -> str | None:
    """`api_url`, else the Prefect API this process is configured with, else None."""
    from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

    return api_url or PREFECT_API_URL.value() or None


def saved_receivers(
    api_url: str | None, slack_block: str = SLACK_BLOCK, pagerduty_block: str = PAGERDUTY_BLOCK
) -> AlertReceivers:
    """The Slack channel and PagerDuty service saved as blocks on the Prefect API `api_url`
    (else the configured one); none when there is no API or it cannot be read (then `note`
    says why)."""
    api = prefect_api(api_url)
    if api is None:
        return AlertReceivers(note="no Prefect API to read the Slack / PagerDuty blocks from")
    try:
        with _prefect_settings(api):
            slack = load_slack_channel(slack_block)
            pagerduty = load_pagerduty_service(pagerduty_block)
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        note = f"cannot read the Slack / PagerDuty blocks from {api}: {type(exc).__name__}"
        return AlertReceivers(note=note)
    return AlertReceivers(slack=slack, pagerduty=pagerduty)


def stack_pipeline_config(api_url: str | None) -> PipelineConfig:
    """The pipeline's configuration as the stack's commands see it (ELICE_CONFIG, else the
    embedded default; saved blocks are read from `api_url`, else the configured API).

    Raises:
        ConfigError: the configuration is invalid or cannot be read.
    """
    with _prefect_settings(prefect_api(api_url)):
        return load_config()


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` to `path` atomically (a reader never sees half a file) with `mode`;
    False when it already held exactly that."""
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            path.chmod(mode)
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


SECRET_FILES = ("slack-webhook-url", "slack-bot-token", "pagerduty-routing-key")


def _write_secrets(folder: Path, receivers: AlertReceivers) -> dict[str, Path]:
    """The receivers' secrets in files of mode 0600 in a folder of mode 0700 (stale ones
    removed); returns the files by name."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    values: dict[str, str] = {}
    if receivers.slack is not None:
        if receivers.slack.webhook_url is not None:
            values["slack-webhook-url"] = receivers.slack.webhook_url.get_secret_value()
        elif receivers.slack.bot_token is not None:
            values["slack-bot-token"] = receivers.slack.bot_token.get_secret_value()
    if receivers.pagerduty is not None:
        values["pagerduty-routing-key"] = receivers.pagerduty.routing_key.get_secret_value()
    for name in SECRET_FILES:
        if name in values:
            write_if_changed(folder / name, values[name] + "\n", mode=0o600)
        else:
            (folder / name).unlink(missing_ok=True)
    return {name: folder / name for name in values}


def _copy_rules(folder: Path) -> tuple[list[Path], bool]:
    """The project's rule files copied into `folder` (a checkout that changes under a
    running Prometheus does not change what it evaluates); True when any changed."""
    source = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    originals = sorted(
        {p for pattern in source["rule_files"] for p in PROMETHEUS_YML.parent.glob(pattern)}
    )
    folder.mkdir(parents=True, exist_ok=True)
    changed = False
    copies = []
    for original in originals:
        copy_ = folder / original.name
        changed |= write_if_changed(copy_, original.read_text(encoding="utf-8"))
        copies.append(copy_)
    for stale in set(folder.glob("*.yml")) - set(copies):
        stale.unlink()
        changed = True
    return copies, changed


def write_alertmanager_config(
    folder: Path, receivers: AlertReceivers, alert_log_url: str
) -> tuple[Path, bool]:
    """Write the receivers' secrets and the Alertmanager config into `folder`; returns the
    config file and whether it changed (a running Alertmanager must restart to read it)."""
    secrets = _write_secrets(folder / "secrets", receivers)
    slack, pagerduty = receivers.slack, receivers.pagerduty
    config = alertmanager_config(
        alert_log_url,
        slack_webhook_file=secrets.get("slack-webhook-url"),
        slack_token_file=secrets.get("slack-bot-token"),
        slack_api_url=f"{slack.base_url}chat.postMessage" if slack else None,
        slack_channel=slack.channel if slack else None,
        pagerduty_key_file=secrets.get("pagerduty-routing-key"),
        pagerduty_url=pagerduty.events_url if pagerduty else None,
    )
    path = folder / "alertmanager.yml"
    return path, write_if_changed(path, yaml.safe_dump(config, sort_keys=False))


def write_prometheus_config(
    folder: Path,
    config: PipelineConfig,
    alertmanager: str,
    *,
    scrape_interval: str = "5s",
    evaluation_interval: str = "5s",
) -> tuple[Path, bool]:
    """Write the targets, the project's rules and the Prometheus config into `folder`;
    returns the config file and whether it or a rule changed (a running Prometheus must
    restart then; the targets file it reads again by itself)."""
    targets = folder / "targets.json"
    write_if_changed(targets, json.dumps(scrape_targets(config), indent=2) + "\n")
    rules, rules_changed = _copy_rules(folder / "rules")
    prometheus = prometheus_config(
        targets,
        alertmanager,
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
        rule_files=rules,
        green_targets=folder / GREEN_TARGETS.name,
    )
    path = folder / "prometheus.yml"
    changed = write_if_changed(path, yaml.safe_dump(prometheus, sort_keys=False))
    return path, changed or rules_changed

"""The seed's nine alerts: thresholds, escalation by duration, promtool cases with teeth,
and a real Alertmanager sending warnings to Slack and criticals to PagerDuty."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.tools import (
    ALERTMANAGER_YML,
    PROMETHEUS_DIR,
    free_port,
    get_json,
    load_yaml,
    post_json,
    start_server,
    stop_server,
    tool,
    wait_for,
)
from tests.plugins.receivers import Receiver

ALERTS_YML = PROMETHEUS_DIR / "rules" / "alerts.yml"
TESTS_DIR = PROMETHEUS_DIR / "tests"

# alert -> (threshold as written in its expression, warning `for`, critical `for`)
NINE = {
    "ServiceDown": ('up{job="elice-services"} == 0', "1m", "5m"),
    "HighErrorRate": ("service:http_request_error_ratio:rate5m > 0.05", "5m", "15m"),
    "HighLatency": ("service:http_request_duration_seconds:mean5m > 1", "5m", "15m"),
    "HighCpuUsage": ("pod:container_cpu_usage:ratio_of_limit > 0.8", "5m", "15m"),
    "HighMemoryUsage": ("pod:container_memory_working_set:ratio_of_limit > 0.85", "5m", "15m"),
    "HighDiskUsage": ("persistentvolumeclaim:kubelet_volume_stats_used:ratio > 0.9", "5m", "30m"),
    "LoginFailureSpike": ("service:auth_login_failures:rate5m > 0.1", "5m", "15m"),
    "ApiTrafficAnomaly": ("service:http_api_requests:rate1h_1w_ago", "15m", "1h"),
    "DatabasePoolExhausted": ("service:db_pool_usage:ratio >= 0.9", "2m", "10m"),
}


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS_YML)
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(duration[:-1]) * units[duration[-1]]


def rule_tests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, case)
        for path in sorted(TESTS_DIR.glob("*.yml"))
        for group in load_yaml(path)["tests"]
        for case in group.get("alert_rule_test", [])
    ]


@pytest.mark.parametrize("name", sorted(NINE))
def test_each_of_the_nine_escalates_from_warning_to_critical(name: str) -> None:
    threshold, warning_for, critical_for = NINE[name]
    rules = {r["labels"]["severity"]: r for r in alert_rules() if r["alert"] == name}
    assert sorted(rules) == ["critical", "warning"], name
    assert rules["warning"]["expr"] == rules["critical"]["expr"], "same condition, longer wait"
    assert threshold in rules["warning"]["expr"]
    assert (rules["warning"]["for"], rules["critical"]["for"]) == (warning_for, critical_for)
    assert seconds(critical_for) > seconds(warning_for)
    for rule in rules.values():
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_every_alert_has_firing_and_quiet_cases() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert set(NINE) <= names
    cases = rule_tests()
    for name in names:
        mine = [c for _, c in cases if c["alertname"] == name]
        fired = {a["exp_labels"]["severity"] for c in mine for a in c["exp_alerts"]}
        severities = {r["labels"]["severity"] for r in alert_rules() if r["alert"] == name}
        assert fired == severities, f"{name}: cases fire {fired}, rules have {severities}"
        assert any(c["exp_alerts"] == [] for c in mine), f"{name}: no case where it stays quiet"


def _cases_of(name: str) -> list[str]:
    """The promtool test files holding cases of alert `name`: a mutation of that alert
    has teeth if one of its own cases fails, so the other files (the traffic file's week
    of series is most of promtool's time) need not run for it."""
    files = sorted(
        p.name for p in TESTS_DIR.glob("*.yml") if f"alertname: {name}\n" in p.read_text()
    )
    assert files, f"no promtool case names {name}"
    return files


def _mutated_run(tmp_path: Path, name: str, old: str, new: str, count: int = -1) -> str:
    """Run promtool's unit tests of alert `name` against alerts.yml with ``old`` replaced;
    return the output."""
    shutil.copytree(PROMETHEUS_DIR / "rules", tmp_path / "rules")
    shutil.copytree(TESTS_DIR, tmp_path / "tests")
    alerts = tmp_path / "rules" / "alerts.yml"
    text = alerts.read_text(encoding="utf-8")
    assert old in text, old
    alerts.write_text(text.replace(old, new, count), encoding="utf-8")
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", *_cases_of(name)],
        cwd=tmp_path / "tests",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0, f"promtool passed with {old!r} -> {new!r}"
    return proc.stdout + proc.stderr


# Raising a threshold must break a firing case; lowering it must break a quiet case.
_DOWN = 'up{job="elice-services"} == 0'
_CRITICAL = "\n        labels:\n          severity: critical"
MUTATIONS = [
    ("ServiceDown", 'up{job="elice-services"} == 0', 'up{job="elice-services"} == -1', -1),
    ("ServiceDown", f"{_DOWN}\n        for: 1m", f"{_DOWN}\n        for: 0s", 1),
    ("HighErrorRate", "rate5m > 0.05", "rate5m > 0.5", -1),
    ("HighErrorRate", "rate5m > 0.05", "rate5m > 0.01", -1),
    ("HighLatency", "mean5m > 1", "mean5m > 2", -1),
    ("HighLatency", "mean5m > 1", "mean5m > 0.4", -1),
    ("HighCpuUsage", "ratio_of_limit > 0.8", "ratio_of_limit > 0.95", -1),
    ("HighCpuUsage", "cpu_usage:ratio_of_limit > 0.8", "cpu_usage:ratio_of_limit > 0.4", -1),
    ("HighMemoryUsage", "ratio_of_limit > 0.85", "ratio_of_limit > 0.99", -1),
    ("HighMemoryUsage", "ratio_of_limit > 0.85", "ratio_of_limit > 0.4", -1),
    ("HighDiskUsage", "used:ratio > 0.9", "used:ratio > 0.99", -1),
    ("HighDiskUsage", "used:ratio > 0.9", "used:ratio > 0.4", -1),
    ("LoginFailureSpike", "failures:rate5m > 0.1", "failures:rate5m > 5", -1),
    ("LoginFailureSpike", "failures:rate5m > 0.1", "failures:rate5m > 0.01", -1),
    ("LoginFailureSpike", "> 3 * (", "> 0.5 * (", -1),
    ("ApiTrafficAnomaly", "rate1h > 2 *", "rate1h > 4 *", -1),
    ("ApiTrafficAnomaly", "rate1h_1w_ago > 0.1", "rate1h_1w_ago > 0.01", -1),
    ("DatabasePoolExhausted", "ratio >= 0.9", "ratio >= 0.95", -1),
    ("DatabasePoolExhausted", "ratio >= 0.9", "ratio >= 0.8", -1),
    ("ServiceDown", f"for: 5m{_CRITICAL}", f"for: 30m{_CRITICAL}", 1),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("name", "old", "new", "count"), MUTATIONS)
def test_promtool_cases_have_teeth(
    tmp_path: Path, name: str, old: str, new: str, count: int
) -> None:
    output = _mutated_run(tmp_path, name, old, new, count)
    assert f"alertname: {name}" in output


def test_probe_requests_do_not_count_as_api_traffic(tmp_path: Path) -> None:
    """Probes surge when replicas are added: counting them would page for nothing."""
    recording = PROMETHEUS_DIR / "rules" / "recording.yml"
    text = recording.read_text(encoding="utf-8")
    assert text.count('{path!~"/health|/ready|/metrics"}') == 2
    shutil.copytree(PROMETHEUS_DIR / "rules", tmp_path / "rules")
    shutil.copytree(TESTS_DIR, tmp_path / "tests")
    (tmp_path / "rules" / "recording.yml").write_text(
        text.replace('{path!~"/health|/ready|/metrics"}', ""), encoding="utf-8"
    )
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", "traffic_test.yml"],
        cwd=tmp_path / "tests",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert 'service="user"' in proc.stdout + proc.stderr


# --- a real Alertmanager -------------------------------------------------------------


def _alert(severity: str, environment: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {"severity": severity, "environment": environment, "team": "platform", **labels},
        "annotations": {"summary": f"{labels['alertname']} {severity} in {environment}"},
    }


@pytest.fixture
def alertmanager(tmp_path: Path, running_receiver: Receiver) -> Any:
    """The project's Alertmanager config with its secrets and endpoints pointed at the receiver."""
    (tmp_path / "slack-webhook-url").write_text(running_receiver.webhook_url, encoding="utf-8")
    (tmp_path / "pagerduty-routing-key").write_text("r0ut1ngk3y\n", encoding="utf-8")
    config = load_yaml(ALERTMANAGER_YML)
    config["route"]["group_wait"] = "0s"
    config["route"]["group_interval"] = "1s"
    for route in config["route"]["routes"]:
        route["group_wait"] = "0s"
        route["group_interval"] = "1s"
    for receiver in config["receivers"]:
        for pd in receiver.get("pagerduty_configs", []):
            pd["routing_key_file"] = str(tmp_path / "pagerduty-routing-key")
            pd["url"] = running_receiver.pagerduty_url
        for slack in receiver.get("slack_configs", []):
            slack["api_url_file"] = str(tmp_path / "slack-webhook-url")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    web = f"127.0.0.1:{free_port()}"
    proc = start_server(
        [
            tool("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address={web}",
            "--cluster.listen-address=",
        ],
        f"http://{web}/-/ready",
        tmp_path / "alertmanager.log",
    )
    yield f"http://{web}/api/v2/alerts"
    stop_server(proc)


def test_warning_goes_to_slack_then_the_escalated_critical_pages(
    alertmanager: str, running_receiver: Receiver
) -> None:
    down = {"alertname": "HighCpuUsage", "service": "search", "pod": "search-7c9d8f6b5-x2k4p"}
    post_json(alertmanager, [_alert("warning", "production", **down)])
    slack = wait_for("the warning in Slack", lambda: running_receiver.requests_to("XXXX"))[0]
    assert "HighCpuUsage" in json.dumps(slack.payload())
    assert running_receiver.requests_to("/v2/enqueue") == []

    # Escalated: the critical pages, and inhibits its own warning from then on.
    post_json(alertmanager, [_alert("critical", "production", **down)])
    pages = wait_for("the page", lambda: running_receiver.requests_to("/v2/enqueue"))
    page = pages[0].payload()
    assert page["routing_key"] == "r0ut1ngk3y"
    assert page["event_action"] == "trigger"
    assert page["payload"]["severity"] == "critical"
    assert "HighCpuUsage" in page["payload"]["summary"]

    def warning_inhibited() -> bool:
        alerts = get_json(alertmanager + "?filter=severity%3D%22warning%22")
        return bool(alerts and alerts[0]["status"]["inhibitedBy"])

    wait_for("the warning to be inhibited by its critical", warning_inhibited)


def test_criticals_outside_production_go_to_slack(
    alertmanager: str, running_receiver: Receiver
) -> None:
    post_json(
        alertmanager,
        [
            _alert(
                "critical", "staging", alertname="HighDiskUsage", persistentvolumeclaim="minio-data"
            )
        ],
    )
    slack = wait_for("the staging critical", lambda: running_receiver.requests_to("XXXX"))[0]
    assert "HighDiskUsage" in json.dumps(slack.payload())
    assert running_receiver.requests_to("/v2/enqueue") == []

"""monitoring/: validated by the real promtool, amtool, Prometheus and Alertmanager."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.metrics import GAUGES
from tests.monitoring.tools import (
    ALERTMANAGER_YML,
    MONITORING,
    PROMETHEUS_DIR,
    PROMETHEUS_YML,
    REPO,
    as_file_sd,
    flags,
    free_port,
    get_json,
    load_yaml,
    post_json,
    run,
    start_server,
    stop_server,
    tool,
    wait_for,
)

RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "grafana" / "dashboards" / "elice-services.json"
# Sources of the series the services export: Counter/Gauge/Histogram calls in these files.
EXPORTERS = (
    REPO / "libs" / "servicekit" / "src" / "servicekit" / "metrics.py",
    REPO / "services" / "auth" / "src" / "auth" / "main.py",
)
PIPELINE = REPO / "config" / "pipeline.yaml"

# Series of kube-state-metrics, cAdvisor and the kubelet the rules and the dashboard rely
# on (their documented names); Prometheus' own series.
KUBE_STATE_METRICS = frozenset(
    {
        "kube_deployment_spec_replicas",
        "kube_deployment_status_replicas_available",
        "kube_deployment_status_replicas_updated",
        "kube_pod_container_status_waiting_reason",
        "kube_pod_container_resource_limits",
    }
)
CADVISOR = frozenset({"container_cpu_usage_seconds_total", "container_memory_working_set_bytes"})
KUBELET = frozenset({"kubelet_volume_stats_used_bytes", "kubelet_volume_stats_capacity_bytes"})
PROMETHEUS_BUILTINS = frozenset({"up", "ALERTS"})
# The pipeline's own delivery metrics (tasks/metrics.py, `cicd metrics --prometheus`).
DELIVERY = frozenset(GAUGES)


# --- helpers -------------------------------------------------------------------------


class Recorder:
    """A loopback HTTP server recording every POSTed JSON body by path (Slack, PagerDuty)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.received.append((self.path, json.loads(body)))
                self.send_response(200 if self.path == "/slack" else 202)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status": "success", "ok": true}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in list(self.received) if p == path]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    rec.thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


# PromQL: strip strings, label matchers, ranges and grouping clauses; what is left that is
# not a function call, keyword or number is a metric name.
_PROMQL_STRIP = [
    re.compile(r'"(?:[^"\\]|\\.)*"'),
    re.compile(r"'(?:[^'\\]|\\.)*'"),
    re.compile(r"\{[^}]*\}"),
    re.compile(r"\[[^\]]*\]"),
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),
]
_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan", "Inf", "NaN"}
)
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*\w+\)$")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana label_values query) reads."""
    for pattern in _PROMQL_STRIP:
        expr = pattern.sub(" ", expr)
    return {m for m in _IDENT.findall(expr) if m not in _PROMQL_KEYWORDS}


def servicekit_metrics() -> dict[str, list[str]]:
    """Series names servicekit and the services expose -> their labels, read from source."""
    found: dict[str, list[str]] = {}
    nodes = [n for f in EXPORTERS for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))]
    for node in nodes:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        kind = node.func.id
        if kind not in {"Counter", "Histogram", "Gauge"} or len(node.args) < 3:
            continue
        name = ast.literal_eval(node.args[0])
        labels = list(ast.literal_eval(node.args[2]))
        if kind == "Histogram":
            found[f"{name}_bucket"] = [*labels, "le"]
            found[f"{name}_sum"] = labels
            found[f"{name}_count"] = labels
        elif kind == "Counter":
            found[name if name.endswith("_total") else f"{name}_total"] = labels
        else:
            found[name] = labels
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for f in RULE_FILES for g in load_yaml(f)["groups"] for rule in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def known_metrics() -> set[str]:
    return (
        set(servicekit_metrics())
        | recorded_names()
        | KUBE_STATE_METRICS
        | CADVISOR
        | KUBELET
        | PROMETHEUS_BUILTINS
        | DELIVERY
    )


def pipeline() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(PIPELINE)
    return data


# --- promtool ------------------------------------------------------------------------


def test_kubernetes_discovery_covers_every_service_namespace() -> None:
    config = load_yaml(PROMETHEUS_YML)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = jobs["elice-services"]
    (sd,) = services["kubernetes_sd_configs"]
    namespaces = [env["namespace"] for env in pipeline()["environments"]]
    assert sd["role"] == "pod"
    assert sorted(sd["namespaces"]["names"]) == sorted(namespaces)
    keep = services["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    assert sorted(keep["regex"].split("|")) == sorted(s["name"] for s in pipeline()["services"])
    assert services["honor_labels"] is True, "servicekit's own `service` label must win"
    assert "kubernetes_sd_configs" in jobs["kube-state-metrics"]
    assert config["rule_files"] == ["rules/*.yml"]


def test_promtool_check_config(tmp_path: Path) -> None:
    config = as_file_sd(load_yaml(PROMETHEUS_YML), tmp_path)
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = run(tool("promtool"), "check", "config", checked)
    for rule_file in RULE_FILES:
        assert f"{rule_file}" in proc.stdout, f"promtool did not check {rule_file}"
    assert "FAILED" not in proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    assert RULE_FILES, "no rule files under monitoring/prometheus/rules"
    proc = run(tool("promtool"), "check", "rules", *RULE_FILES)
    assert proc.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests under monitoring/prometheus/tests"
    proc = run(tool("promtool"), "test", "rules", *RULE_TESTS, cwd=PROMETHEUS_DIR / "tests")
    assert (proc.stdout + proc.stderr).count("SUCCESS") == len(RULE_TESTS)


def test_rules_read_only_metrics_that_exist() -> None:
    sk = servicekit_metrics()
    assert "service" in sk["http_requests_total"]
    assert "service" in sk["http_request_duration_seconds_bucket"]
    assert "service" in sk["http_request_errors_total"]
    known = known_metrics()
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')} reads unknown {unknown}"


# --- the flags file and a real Prometheus --------------------------------------------


def test_flags_set_15d_retention_and_are_real_prometheus_flags() -> None:
    assert flags()["storage.tsdb.retention.time"] == "15d"
    help_text = subprocess.run(
        [tool("prometheus"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    for name in flags():
        assert f"--{name}" in help_text.stdout + help_text.stderr, f"unknown flag --{name}"


def pod(service: str, environment: str, namespace: str, port_name: str, address: str) -> Any:
    """A file_sd target group carrying what Kubernetes pod discovery would attach."""
    return {
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": f"{service}-5d8f7",
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": service,
            "__meta_kubernetes_pod_label_app_kubernetes_io_version": "1.4.2",
            "__meta_kubernetes_pod_label_environment": environment,
        },
    }


def canary_pod(group: Any) -> Any:
    """`group` as the pod of a canary Deployment (`track: canary`, its own pod name)."""
    labels = group["labels"]
    name = labels["__meta_kubernetes_pod_name"]
    service = labels["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    return {
        "targets": group["targets"],
        "labels": labels
        | {
            "__meta_kubernetes_pod_name": name.replace(service, f"{service}-canary", 1),
            "__meta_kubernetes_pod_label_track": "canary",
        },
    }


def test_real_prometheus_relabels_targets_and_keeps_15d(tmp_path: Path) -> None:
    """Run Prometheus with ./flags and the config; pod metadata relabels into the labels."""
    metrics_port = free_port()
    targets = [
        pod("payment", "production", "elice-devops-prod", "http", f"127.0.0.1:{metrics_port}"),
        pod("payment", "production", "elice-devops-prod", "debug", "127.0.0.1:1"),
        pod("redis", "production", "elice-devops-prod", "http", "127.0.0.1:2"),
        canary_pod(pod("payment", "production", "elice-devops-prod", "http", "127.0.0.1:3")),
    ]
    (tmp_path / "elice-services.json").write_text(json.dumps(targets), encoding="utf-8")
    (tmp_path / "kube-state-metrics.json").write_text("[]", encoding="utf-8")
    config = as_file_sd(load_yaml(PROMETHEUS_YML), tmp_path)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    config["alerting"] = {"alertmanagers": []}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (
                b"# TYPE http_requests_total counter\n"
                b"http_requests_total"
                b'{service="payment",method="GET",path="/payments",status="200"} 7\n'
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    metrics_server = ThreadingHTTPServer(("127.0.0.1", metrics_port), Metrics)
    threading.Thread(target=metrics_server.serve_forever, daemon=True).start()

    overrides = {
        "config.file": str(tmp_path / "prometheus.yml"),
        "storage.tsdb.path": str(tmp_path / "data"),
    }
    web = f"127.0.0.1:{free_port()}"
    args = [f"--{k}" if v is None else f"--{k}={overrides.get(k, v)}" for k, v in flags().items()]
    proc = start_server(
        [tool("prometheus"), *args, f"--web.listen-address={web}"],
        f"http://{web}/-/ready",
        tmp_path / "prometheus.log",
    )
    try:
        status = get_json(f"http://{web}/api/v1/status/flags")["data"]
        assert status["storage.tsdb.retention.time"] == "15d"

        def active() -> list[Any]:
            data = get_json(f"http://{web}/api/v1/targets")["data"]
            return [t for t in data["activeTargets"] if t["scrapePool"] == "elice-services"]

        def both() -> list[Any]:
            found = active()
            return found if len(found) == 2 else []

        pods = {t["labels"]["pod"]: t for t in wait_for("the payment pods as targets", both)}
        labels = pods["payment-5d8f7"]["labels"]
        # a canary pod (tasks/deploy/canary.py) is measured apart from its environment
        assert pods["payment-canary-5d8f7"]["labels"]["environment"] == "production-canary"
        assert labels["service"] == "payment"
        assert labels["environment"] == "production"
        assert labels["namespace"] == "elice-devops-prod"
        assert labels["pod"] == "payment-5d8f7"
        assert labels["job"] == "elice-services"

        def scraped() -> list[Any]:
            q = "http://" + web + "/api/v1/query?query=http_requests_total"
            return list(get_json(q)["data"]["result"])

        (series,) = wait_for("a scraped http_requests_total", scraped)
        assert series["metric"]["service"] == "payment"
        assert series["metric"]["environment"] == "production"
        assert "exported_service" not in series["metric"]

        groups = get_json(f"http://{web}/api/v1/rules")["data"]["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        assert {"ServiceDown", "HighErrorRate", "service:http_requests:rate5m"} <= loaded
    finally:
        stop_server(proc)
        metrics_server.shutdown()
        metrics_server.server_close()


# --- Alertmanager --------------------------------------------------------------------


def test_amtool_check_config() -> None:
    proc = run(tool("amtool"), "check-config", ALERTMANAGER_YML)
    assert "SUCCESS" in proc.stdout


def test_secrets_come_from_files_never_inline() -> None:
    config = load_yaml(ALERTMANAGER_YML)
    receivers = {r["name"]: r for r in config["receivers"]}
    (pd,) = receivers["pagerduty"]["pagerduty_configs"]
    (slack,) = receivers["slack"]["slack_configs"]
    assert "routing_key_file" in pd
    assert "routing_key" not in pd
    assert "service_key" not in pd
    assert "api_url_file" in slack
    assert "api_url" not in slack
    assert "slack_api_url" not in config.get("global", {})


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["severity=critical", "environment=production"], "pagerduty"),
        (["severity=critical", "environment=staging"], "slack"),
        (["severity=warning", "environment=production"], "slack"),
        (["severity=warning", "environment=dev"], "slack"),
        (["alertname=Watchdog"], "slack"),
    ],
)
def test_amtool_routes(labels: list[str], receivers: str) -> None:
    proc = run(
        tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels
    )
    assert proc.stdout.strip() == receivers


def alert(**labels: str) -> dict[str, Any]:
    return {"labels": labels, "annotations": {"summary": f"{labels['alertname']} test"}}


def test_real_alertmanager_delivers_and_inhibits(tmp_path: Path, recorder: Recorder) -> None:
    """Critical production -> PagerDuty with the key from its file; the rest -> Slack."""
    (tmp_path / "slack-webhook-url").write_text(f"{recorder.url}/slack\n", encoding="utf-8")
    (tmp_path / "pagerduty-routing-key").write_text("r0ut1ngk3y\n", encoding="utf-8")
    config = load_yaml(ALERTMANAGER_YML)
    # Same routes and receivers; local endpoints, secret files in tmp, a short wait. Not
    # none: Alertmanager's inhibitor learns of a source alert asynchronously, and the
    # configured group_wait (30 s) is what lets it see ServiceDown before HighErrorRate's
    # group is sent. With 0 s the second alert was paged on a loaded machine.
    config["route"]["group_wait"] = "2s"
    for route in config["route"]["routes"]:
        route["group_wait"] = "2s"
    for receiver in config["receivers"]:
        for pd in receiver.get("pagerduty_configs", []):
            pd["routing_key_file"] = str(tmp_path / "pagerduty-routing-key")
            pd["url"] = f"{recorder.url}/pagerduty"
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
    try:
        api = f"http://{web}/api/v2/alerts"
        post_json(
            api,
            [
                alert(alertname="ServiceDown", severity="critical", environment="production",
                      service="payment"),
                alert(alertname="HighLatency", severity="warning", environment="staging",
                      service="search"),
            ],
        )  # fmt: skip
        post_json(
            api,
            [
                alert(alertname="HighErrorRate", severity="critical", environment="production",
                      service="payment"),
            ],
        )  # fmt: skip

        # Alertmanager retries a notification it thinks failed (a slow receiver on a
        # loaded machine): the same page may arrive twice, never another alert's.
        pages = wait_for("a PagerDuty event", lambda: recorder.bodies("/pagerduty"))
        assert all("ServiceDown" in p["payload"]["summary"] for p in pages), pages
        page = pages[0]
        assert page["routing_key"] == "r0ut1ngk3y"
        assert page["event_action"] == "trigger"
        assert page["payload"]["severity"] == "critical"
        assert "ServiceDown" in page["payload"]["summary"]

        messages = wait_for("a Slack message", lambda: recorder.bodies("/slack"))
        text = json.dumps(messages)
        assert "HighLatency" in text
        assert "staging" in text
        assert "ServiceDown" not in text

        def inhibited() -> bool:
            alerts = get_json(api + "?filter=alertname%3D%22HighErrorRate%22")
            return bool(alerts and alerts[0]["status"]["inhibitedBy"])

        wait_for("HighErrorRate to be inhibited by ServiceDown", inhibited)
        assert all("HighErrorRate" not in json.dumps(b) for _, b in recorder.received)
    finally:
        stop_server(proc)


# --- Grafana -------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_has_environment_and_service_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["environment"]["type"] == "query"
    assert variables["service"]["multi"] is True
    assert variables["service"]["includeAll"] is True
    assert "$environment" in variables["service"]["definition"]
    for _, expr in panel_exprs():
        if "ALERTS" not in expr:
            assert 'environment="$environment"' in expr, expr


def test_dashboard_panels_cover_rate_errors_latency_replicas_resources_delivery() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = " ".join(expr for _, expr in panel_exprs())
    for needed in (
        "service:http_requests:rate5m",
        "service:http_request_error_ratio:rate5m",
        "service:http_request_duration_seconds:p95_5m",
        "kube_deployment_status_replicas_available",
        "kube_deployment_spec_replicas",
        "pod:container_cpu_usage:ratio_of_limit",
        "pod:container_memory_working_set:ratio_of_limit",
        "elice_delivery_deployment_frequency_per_day",
        "elice_delivery_lead_time_seconds",
        "elice_delivery_change_failure_ratio",
        "elice_delivery_time_to_restore_seconds",
    ):
        assert needed in exprs, f"no panel shows {needed}"
    assert dashboard()["refresh"] == "30s"
    # Panels do not overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_queries_read_only_metrics_that_exist() -> None:
    known = known_metrics()
    queries = panel_exprs() + [
        (v["name"], v["definition"])
        for v in dashboard()["templating"]["list"]
        if v["type"] == "query"
    ]
    for title, expr in queries:
        names = metric_names(_LABEL_VALUES.sub(r"\1", expr))
        assert names, f"{title}: no metric found in {expr!r}"
        assert not names - known, f"{title}: unknown metrics {names - known} in {expr!r}"


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (service, le) (rate(http_request_duration_seconds_bucket{service=~"$service"}[5m]))'
        ' / on (service) group_left sum(up{job="x"}) or vector(0) and bogus_metric offset 5m'
    )
    assert metric_names(expr) == {"http_request_duration_seconds_bucket", "up", "bogus_metric"}


# --- yamllint ------------------------------------------------------------------------


def test_yamllint_monitoring() -> None:
    run(tool("yamllint"), "--strict", "-c", MONITORING / ".yamllint.yml", MONITORING)

"""Prometheus, Alertmanager and the alert log receiver as parts of the stack; their
configuration is written by stack/monitoring_config.py."""

from __future__ import annotations

import sys
from pathlib import Path

from blocks.stack import StackInfo
from core.errors import ConfigError, StackError
from stack.monitoring_config import (
    saved_receivers,
    stack_pipeline_config,
    write_alertmanager_config,
    write_prometheus_config,
)
from stack.ports import recorded_port
from stack.serve import ensure_served, private_log
from stack.status import alert_log_file, alert_log_port_file, recorded_alert_log_port
from stack.steps import Steps
from stack.system import ensure_system_deps
from tasks.process import which

DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093


MONITORING_DEPS = ("prometheus", "prometheus-alertmanager")
MONITORING_PARTS = ("prometheus", "alertmanager", "alert-log")
ALERT_LOG_SCRIPT = Path(__file__).resolve().parents[1] / "daemons" / "alert_log.py"
PROMETHEUS_RETENTION = "15d"


def ensure_monitoring(
    home: Path, previous: StackInfo | None, api_url: str | None, steps: Steps
) -> tuple[str, str]:
    """The alert log receiver, Alertmanager and Prometheus, in that order (each one's
    configuration names the one before); returns Prometheus' and Alertmanager's URLs."""
    ensure_system_deps(MONITORING_DEPS, progress=steps.progress)
    try:
        config = stack_pipeline_config(api_url)
    except ConfigError as exc:
        msg = f"monitoring needs the pipeline's configuration: {exc}"
        raise StackError(msg) from exc
    receivers = saved_receivers(api_url)
    if receivers.note:
        steps.info("alertmanager", receivers.note)
    folder = home / "monitoring"
    folder.mkdir(parents=True, exist_ok=True)
    alerts = alert_log_file(home)

    def alert_log(port: int) -> tuple[list[str], dict[str, str]]:
        args = [sys.executable, str(ALERT_LOG_SCRIPT), "--port", str(port), "--file", str(alerts)]
        return args, {}

    log_port = ensure_served(
        home,
        "alert-log",
        "alert log receiver",
        recorded_alert_log_port(home),
        None,
        False,
        alert_log,
        15,
        steps,
    )
    alert_log_port_file(home).write_text(f"{log_port}\n", encoding="ascii")

    am_yml, am_changed = write_alertmanager_config(
        folder, receivers, f"http://127.0.0.1:{log_port}/alerts"
    )

    def alertmanager(port: int) -> tuple[list[str], dict[str, str]]:
        args = [
            which("prometheus-alertmanager"),
            f"--config.file={am_yml}",
            f"--storage.path={home / 'alertmanager' / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url=http://127.0.0.1:{port}",
            "--cluster.listen-address=",  # one instance: no gossip port
        ]
        return args, {}

    private_log(home, "alertmanager")
    am_port = ensure_served(
        home,
        "alertmanager",
        "Alertmanager",
        recorded_port(previous.alertmanager_url if previous else None),
        DEFAULT_ALERTMANAGER_PORT,
        am_changed,
        alertmanager,
        30,
        steps,
    )
    steps.info("alertmanager", receivers.routes(alerts))

    prom_yml, prom_changed = write_prometheus_config(folder, config, f"127.0.0.1:{am_port}")

    def prometheus(port: int) -> tuple[list[str], dict[str, str]]:
        args = [
            which("prometheus"),
            f"--config.file={prom_yml}",
            f"--storage.tsdb.path={home / 'prometheus' / 'data'}",
            f"--storage.tsdb.retention.time={PROMETHEUS_RETENTION}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url=http://127.0.0.1:{port}",
        ]
        return args, {}

    prom_port = ensure_served(
        home,
        "prometheus",
        "Prometheus",
        recorded_port(previous.prometheus_url if previous else None),
        DEFAULT_PROMETHEUS_PORT,
        prom_changed,
        prometheus,
        60,
        steps,
    )
    envs = [env.name for env in config.environments.environments]
    services = len(config.catalog.services)
    steps.info("prometheus", f"scraping {services} services in {', '.join(envs)}")
    return f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"

"""The alert log receiver (daemons/alert_log.py), the stack's default Alertmanager receiver,
run as a part the way the stack runs it."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import httpx

from stack.monitoring import ALERT_LOG_SCRIPT
from stack.ports import free_port
from stack.supervisor import part_log_tail, spawn_part, stop_part
from tests.monitoring.tools import post_json, wait_for


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_alert_log_writes_one_private_json_line_per_alert(tmp_path: Path) -> None:
    port = free_port()
    alerts = tmp_path / "logs" / "alerts.log"
    args = [sys.executable, str(ALERT_LOG_SCRIPT), "--port", str(port), "--file", str(alerts)]
    spawn_part(tmp_path, "alert-log", args)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the alert log", lambda: _answers(f"{url}/-/healthy"), timeout=15)
        assert _mode(alerts) == 0o600
        notification = {
            "receiver": "pagerduty",
            "status": "firing",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "ServiceDown", "severity": "critical", "service": "a"},
                    "annotations": {"summary": "a is down in production"},
                    "startsAt": "2024-05-01T12:00:00Z",
                },
                {"status": "resolved", "labels": {"alertname": "HighLatency", "service": "b"}},
            ],
        }
        post_json(f"{url}/alerts", notification)
        bad = httpx.post(f"{url}/alerts", content=b"[1, 2]", timeout=5)
        assert bad.status_code == 400
        assert "not an Alertmanager notification" in bad.text
        lines = _log_lines(alerts)
        assert [(e["receiver"], e["status"], e["alertname"], e["service"]) for e in lines] == [
            ("pagerduty", "firing", "ServiceDown", "a"),
            ("pagerduty", "resolved", "HighLatency", "b"),
        ]
        assert lines[0]["annotations"] == {"summary": "a is down in production"}
        assert lines[0]["severity"] == "critical"
    finally:
        assert stop_part(tmp_path, "alert-log")
    assert "alert log: 127.0.0.1" in part_log_tail(tmp_path, "alert-log")

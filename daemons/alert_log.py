"""The local stack's default alert receiver: Alertmanager's webhook, written to a log.

Without a configured Slack channel or PagerDuty service, the local Alertmanager posts its
notifications here (`webhook_configs`); each alert of each notification becomes one JSON
line in the log file (mode 0600): when it arrived, the receiver it was routed to, firing
or resolved, its labels, annotations and times. `GET /-/healthy` answers `ok`.

Run as a stack part (`stack/monitoring.py` starts it by path, so it imports nothing of the
project): `python alert_log.py --port PORT --file PATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY = 4 * 1024 * 1024  # Alertmanager batches alerts of one group; this is plenty


def alert_lines(notification: Any, received: str) -> list[str]:
    """One JSON line per alert of an Alertmanager webhook notification.

    Raises:
        ValueError: the body is not an Alertmanager notification.
    """
    if not isinstance(notification, dict) or not isinstance(notification.get("alerts"), list):
        msg = "not an Alertmanager notification: no list of alerts"
        raise ValueError(msg)  # noqa: TRY004 - a bad request body, answered 400
    lines = []
    for alert in notification["alerts"]:
        if not isinstance(alert, dict):
            msg = "not an Alertmanager notification: an alert is not an object"
            raise ValueError(msg)  # noqa: TRY004 - a bad request body, answered 400
        labels = alert.get("labels") or {}
        entry = {
            "received": received,
            "receiver": notification.get("receiver", ""),
            "status": alert.get("status", notification.get("status", "")),
            "alertname": labels.get("alertname", ""),
            "severity": labels.get("severity", ""),
            "environment": labels.get("environment", ""),
            "service": labels.get("service", ""),
            "labels": labels,
            "annotations": alert.get("annotations") or {},
            "startsAt": alert.get("startsAt", ""),
            "endsAt": alert.get("endsAt", ""),
            "fingerprint": alert.get("fingerprint", ""),
        }
        lines.append(json.dumps(entry, sort_keys=True) + "\n")
    return lines


class AlertLog:
    """Appends lines to `path` (created 0600), one writer at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        path.chmod(0o600)

    def append(self, lines: list[str]) -> None:
        data = "".join(lines).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


def make_server(port: int, log: AlertLog) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:`port` writing the notifications it gets to `log`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in {"/-/healthy", "/-/ready"}:
                self._answer(200, b"ok\n")
            else:
                self._answer(404, b"not found\n")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._answer(400, b"expected a JSON body\n")
                return
            body = self.rfile.read(length)
            received = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            try:
                lines = alert_lines(json.loads(body), received)
            except ValueError as exc:  # json.JSONDecodeError is one
                self._answer(400, f"{exc}\n".encode())
                return
            log.append(lines)
            self._answer(200, b"ok\n")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ARG002
            return  # the alerts go to the log file; requests need no second record

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    """Serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", type=Path, required=True)
    args = parser.parse_args(argv)
    server = make_server(args.port, AlertLog(args.file))
    print(f"alert log: 127.0.0.1:{args.port} -> {args.file}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""Local HTTP receivers that record what Slack and PagerDuty would get.

Fixture `running_receiver` (function scope) yields a started `Receiver`: a real HTTP
server on 127.0.0.1 (a free port) in a background thread. It records every request and
answers from a script, falling back to the real services' success answers:

    POST .../chat.postMessage   200 {"ok": true, "channel": <channel>, "ts": "<n>.000100"}
    POST .../v2/enqueue          202 {"status": "success", "message": "Event processed",
                                      "dedup_key": <the request's dedup_key>}
    POST /services/...           200 "ok"            (a Slack incoming webhook)
    anything else                404 {"ok": false, "error": "unknown_path"}

API:
    receiver.url                      "http://127.0.0.1:<port>"
    receiver.slack_base_url           receiver.url + "/api/"  (SlackChannel.base_url)
    receiver.pagerduty_url            receiver.url + "/v2/enqueue"  (PagerDutyService.events_url)
    receiver.webhook_url              receiver.url + "/services/T000/B000/XXXX"
    receiver.script(path_suffix, *replies)
        queue answers for requests whose path ends with `path_suffix`, used in order,
        then the defaults; e.g.
        receiver.script("chat.postMessage", Reply(429, {"ok": False, "error": "ratelimited"},
                        headers={"Retry-After": "1"}))
    receiver.requests                 list[Recorded], in arrival order (a copy)
    receiver.requests_to(path_suffix) the recorded requests whose path ends with it
    receiver.wait_for(n, timeout=10)  block until n requests arrived; returns them

`Recorded` has method, path, query (dict), headers (lower-case names), body (bytes),
json (parsed JSON body or None), form (dict of a form body or None) and `.payload()`:
the JSON or form body, whichever it was.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Recorded:
    """One request as the receiver saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any
    form: dict[str, str] | None

    def payload(self) -> Any:
        """The JSON body, else the form body."""
        return self.json if self.json is not None else self.form


class Receiver:
    """A recording HTTP server; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._requests: list[Recorded] = []
        self._scripts: dict[str, deque[Reply]] = {}
        self._ts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                reply = receiver._record(self.command, self.path, dict(self.headers), body)
                data = json.dumps(reply.json).encode() if reply.json is not None else reply.body
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json"} if reply.json is not None else {}
                headers.update(reply.headers)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.slack_base_url = f"{self.url}/api/"
        self.pagerduty_url = f"{self.url}/v2/enqueue"
        self.webhook_url = f"{self.url}/services/T000/B000/XXXX"

    def start(self) -> Receiver:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def script(self, path_suffix: str, *replies: Reply) -> None:
        """Answer the next requests to `...path_suffix` with `replies`, in order."""
        with self._lock:
            self._scripts.setdefault(path_suffix, deque()).extend(replies)

    @property
    def requests(self) -> list[Recorded]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path_suffix: str) -> list[Recorded]:
        """Requests whose path ends with `path_suffix`."""
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    def wait_for(self, count: int, timeout: float = 10) -> list[Recorded]:
        """Block until `count` requests have arrived; fail the test after `timeout` s."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._requests) >= count, timeout):
                pytest.fail(f"receiver got {len(self._requests)} requests, expected {count}")
            return list(self._requests)

    def _record(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Reply:
        parts = urlsplit(raw_path)
        lower = {k.lower(): v for k, v in headers.items()}
        ctype = lower.get("content-type", "")
        parsed_json: Any = None
        form: dict[str, str] | None = None
        if "json" in ctype and body:
            parsed_json = json.loads(body)
        elif "x-www-form-urlencoded" in ctype:
            form = dict(parse_qsl(body.decode()))
        request = Recorded(
            method=method,
            path=parts.path,
            query=dict(parse_qsl(parts.query)),
            headers=lower,
            body=body,
            json=parsed_json,
            form=form,
        )
        with self._lock:
            self._requests.append(request)
            reply = self._scripted(parts.path) or self._default(request)
            self._lock.notify_all()
        return reply

    def _scripted(self, path: str) -> Reply | None:
        for suffix, queue in self._scripts.items():
            if path.endswith(suffix) and queue:
                return queue.popleft()
        return None

    def _default(self, request: Recorded) -> Reply:
        payload = request.payload() or {}
        if request.path.endswith("/chat.postMessage"):
            self._ts += 1
            channel = payload.get("channel", "")
            return Reply(200, {"ok": True, "channel": channel, "ts": f"{self._ts}.000100"})
        if request.path.endswith("/v2/enqueue"):
            return Reply(
                202,
                {
                    "status": "success",
                    "message": "Event processed",
                    "dedup_key": payload.get("dedup_key"),
                },
            )
        if request.path.startswith("/services/"):
            return Reply(200, headers={"Content-Type": "text/plain"}, body=b"ok")
        return Reply(404, {"ok": False, "error": "unknown_path"})


@pytest.fixture
def running_receiver() -> Iterator[Receiver]:
    """A started recording receiver, stopped after the test."""
    receiver = Receiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()

"""Reach a cluster's services from outside it: the API server's service proxy, on loopback.

A worker outside the cluster cannot resolve `<service>.<namespace>.svc.cluster.local`.
The API server proxies HTTP to a Service (`/api/v1/namespaces/<ns>/services/<name>:<port>
/proxy/<path>`), but only for a client that authenticates. This module serves that path
on 127.0.0.1 and adds the cluster credentials to each request, as `kubectl proxy` does,
so health checks and baselines use a plain base URL and no secret passes through a task.

Only GETs of service-proxy paths are forwarded; anything else is refused (403), so the
loopback port is no way into the rest of the API. Credentials are read from the client
configuration on every request: tokens an exec plugin (`aws eks get-token`) refreshes
stay fresh.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

PROXY_PATH = re.compile(
    r"^/api/v1/namespaces/[a-z0-9]([-a-z0-9]*[a-z0-9])?/services/"
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(:[a-z0-9-]+)?/proxy(/[^\s]*)?$"
)
UPSTREAM_TIMEOUT_S = 30.0

_lock = threading.Lock()
_proxies: dict[str, ServiceProxy] = {}


def service_path(namespace: str, service: str, port: int | str) -> str:
    """The API server's proxy path of a Service port."""
    return f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"


def _credentials(configuration: Any) -> tuple[dict[str, str], bool | str, tuple[str, str] | None]:
    """(headers, verify, client certificate) of a `kubernetes.client.Configuration`."""
    headers = {}
    # runs the refresh hook (exec plugins); older clients key it "authorization"
    token = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
    if token:
        headers["Authorization"] = token
    verify: bool | str = bool(configuration.verify_ssl)
    if verify and configuration.ssl_ca_cert:
        verify = str(configuration.ssl_ca_cert)
    cert = (
        (str(configuration.cert_file), str(configuration.key_file))
        if configuration.cert_file and configuration.key_file
        else None
    )
    return headers, verify, cert


class ServiceProxy:
    """A loopback HTTP server forwarding service-proxy GETs to one API server."""

    def __init__(self, configuration: Any) -> None:
        self.configuration = configuration
        self.upstream = str(configuration.host).rstrip("/")
        _, verify, cert = _credentials(configuration)
        self._client = httpx.Client(verify=verify, cert=cert, timeout=UPSTREAM_TIMEOUT_S)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ARG002
                return

            def do_GET(self) -> None:
                proxy.forward(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="k8s-service-proxy", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _reply(self, request: BaseHTTPRequestHandler, code: int, body: bytes, kind: str) -> None:
        request.send_response(code)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def forward(self, request: BaseHTTPRequestHandler) -> None:
        """Relay one GET, with the cluster's credentials, if it is a service-proxy path."""
        path = request.path
        if not PROXY_PATH.match(path.split("?", 1)[0]):
            self._reply(request, 403, b"only service proxy GETs are forwarded\n", "text/plain")
            return
        headers, _, _ = _credentials(self.configuration)
        try:
            answer = self._client.get(self.upstream + path, headers=headers)
        except httpx.HTTPError as exc:
            message = f"the API server did not answer: {type(exc).__name__}\n".encode()
            self._reply(request, 502, message, "text/plain")
            return
        kind = answer.headers.get("content-type", "application/octet-stream")
        try:
            self._reply(request, answer.status_code, answer.content, kind)
        except (BrokenPipeError, ConnectionResetError):  # the prober gave up
            return

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


def service_proxy(configuration: Any, identity: str) -> ServiceProxy:
    """The process's proxy to the API server of `configuration`, started on first use.

    `identity` tells clusters and credentials apart (it is hashed, never kept).
    """
    key = hashlib.sha256(f"{configuration.host}\n{identity}".encode()).hexdigest()
    with _lock:
        proxy = _proxies.get(key)
        if proxy is None:
            proxy = _proxies[key] = ServiceProxy(configuration)
        return proxy

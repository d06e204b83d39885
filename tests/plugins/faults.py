"""A fault-injecting proxy for the services the pipeline talks to, on loopback.

`FaultProxy` listens on 127.0.0.1 and forwards each connection to an upstream (a TCP
address or a unix socket: a registry, the Docker API, moto's S3, the Prefect API, a
Kubernetes API server). It speaks HTTP/1.1 far enough to see each request: it reads the
request head, asks the upstream to close after one answer (`Connection: close`, so every
request is a connection of its own and the proxy sees them all), and applies the first
matching `Fault` before it forwards:

- `refuse`: the connection is closed before anything is answered.
- `status`: an HTTP answer of the proxy's own (503, 500, 429 with `Retry-After`).
- `drop`: the request is forwarded, then the answer is cut after `after_bytes`.
- `delay`: the request waits `seconds` before it is forwarded (a slow upstream, a timeout).

A fault matches by method and a regular expression on the path, and fires for requests
`first` to `first + times - 1` among those that match it (counting from 1), or for every
match while `until` (a monotonic time) has not passed, or for `window` seconds from its
first firing (an outage that starts when the traffic reaches it). `requests` records
what was seen.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

Kind = Literal["refuse", "status", "drop", "delay"]


@dataclass
class Fault:
    """One fault: what, for which requests, how often."""

    kind: Kind
    path: str = ".*"
    method: str | None = None
    status: int = 503
    retry_after: int | None = None
    body: bytes | None = None  # the `status` answer's JSON body (default: a registry's)
    after_bytes: int = 0
    seconds: float = 0.0
    first: int = 1
    times: int | None = 1  # None: every matching request (bounded by `until` if set)
    until: float | None = None
    window: float | None = None
    seen: int = 0
    fired: int = 0
    started: float | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if not re.search(self.path, path):
            return False
        self.seen += 1
        if self.until is not None and time.monotonic() > self.until:
            return False
        if self.seen < self.first:
            return False
        if self.times is not None and self.seen >= self.first + self.times:
            return False
        now = time.monotonic()
        if self.window is not None and self.started is not None:
            if now > self.started + self.window:
                return False
        self.started = self.started or now
        self.fired += 1
        return True


@dataclass
class FaultProxy:
    """A loopback proxy in front of `upstream` ("host:port" or a unix socket path)."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, verdict

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        """host:port of the proxy."""
        return f"127.0.0.1:{self.port}"

    def inject(self, fault: Fault) -> Fault:
        """Add `fault` (it applies to the requests from now on)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault: the proxy forwards everything again."""
        with self._lock:
            self.faults.clear()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _connect(self) -> socket.socket:
        if self.upstream.startswith("/"):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self.upstream)
            return conn
        host, _, port = self.upstream.rpartition(":")
        return socket.create_connection((host, int(port)), timeout=300)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    return fault
        return None

    def _serve(self, client: socket.socket) -> None:
        with client:
            head, rest = _read_head(client)
            if head is None:
                return
            request_line, *headers = head.split(b"\r\n")
            method, path = [*request_line.decode("latin-1").split(" "), "", ""][:2]
            fault = self._fault_for(method, path)
            verdict = fault.kind if fault else "pass"
            with self._lock:
                self.requests.append((method, path, verdict))
            if fault is not None and fault.kind == "refuse":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                return  # closed with a reset, before any answer
            if fault is not None and fault.kind == "status":
                client.sendall(_answer(fault.status, fault.retry_after, fault.body))
                return
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            kept = [h for h in headers if not h.lower().startswith(b"connection:")]
            forwarded = b"\r\n".join([request_line, *kept, b"Connection: close"]) + b"\r\n\r\n"
            try:
                upstream = self._connect()
            except OSError:
                client.sendall(_answer(502, None))
                return
            with upstream:
                upstream.sendall(forwarded + rest)
                limit = fault.after_bytes if fault is not None and fault.kind == "drop" else None
                _relay(client, upstream, limit)


TLS_HANDSHAKE = 0x16
"""The first byte of a TLS ClientHello record."""

PLAIN_HTTP_ONLY = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n400 Bad Request"
)
"""What a plain-HTTP Go server (the registry, Podman's API) answers a TLS handshake with."""


def _read_head(conn: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        if not data and chunk[0] == TLS_HANDSHAKE:
            # A client told a registry is insecure (skopeo, Podman) tries HTTPS first and
            # falls back to HTTP on the plain server's answer. Left unanswered, it waited
            # out its TLS handshake timeout (10 s) on every connection to a new address.
            conn.sendall(PLAIN_HTTP_ONLY)
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _answer(status: int, retry_after: int | None, body: bytes | None = None) -> bytes:
    body = body or b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    return (
        f"HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _relay(client: socket.socket, upstream: socket.socket, limit: int | None) -> None:
    """Client bytes up (a request body), upstream bytes down, until the upstream closes;
    with `limit`, the answer is cut after that many bytes."""

    def up() -> None:
        try:
            while chunk := client.recv(65536):
                upstream.sendall(chunk)
        except OSError:
            pass

    threading.Thread(target=up, daemon=True).start()
    sent = 0
    try:
        while chunk := upstream.recv(65536):
            if limit is not None and sent + len(chunk) >= limit:
                client.sendall(chunk[: max(limit - sent, 0)])
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                # Shut down, not only closed: `up` is blocked in client.recv, and on Linux
                # a close() while another thread reads keeps the connection open, so the
                # client saw a stall until its read timeout (60 s) instead of a cut answer.
                client.shutdown(socket.SHUT_RDWR)
                return
            client.sendall(chunk)
            sent += len(chunk)
    except OSError:
        return


@pytest.fixture
def fault_proxy() -> Iterator[type[FaultProxy]]:
    """Make `FaultProxy(upstream)`s; every one made is closed after the test."""
    made: list[FaultProxy] = []

    class Tracked(FaultProxy):
        def __post_init__(self) -> None:
            super().__post_init__()
            made.append(self)

    yield Tracked
    for proxy in made:
        proxy.close()

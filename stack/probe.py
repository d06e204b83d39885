"""Whether each part of the stack is up: its process holds its address and answers there.

No Prefect, no httpx, no docker client: `cicd stack status` runs these checks in a process
that imports nothing else of the stack, and `ensure_stack` runs the same ones before it
reuses a part. A GET is the standard library's HTTP client, on a loopback port or on the
engine's unix socket, never through a proxy (the environment's proxies do not reach
127.0.0.1, and a check must not ask a third party).
"""

from __future__ import annotations

import http.client
import re
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit

from stack.ports import part_listens

TIMEOUT_S = 3.0

# What each monitoring part answers 200 on once it serves.
READY_PATHS = {
    "prometheus": "/-/ready",
    "alertmanager": "/-/ready",
    "alert-log": "/-/healthy",
    "slack-receiver": "/health",
}


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the unix socket at `path` (the engine's API)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("engine", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def http_status(url: str, socket_path: str | None = None, timeout: float = TIMEOUT_S) -> int | None:
    """The status of a GET of `url` (over the unix socket `socket_path` when given); None
    when nothing answered, or `url` is not http(s)."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    conn: http.client.HTTPConnection
    try:
        if socket_path is not None:
            conn = _UnixConnection(socket_path, timeout)
        elif parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    except ValueError:  # a port that is no number
        return None
    try:
        conn.request("GET", target)
        answer = conn.getresponse()
        answer.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return answer.status


def http_ok(url: str, socket_path: str | None = None) -> bool:
    """`url` answers a GET with 200 within 3 s (see `http_status`)."""
    return http_status(url, socket_path) == 200


# --- the engine ----------------------------------------------------------------------


def engine_paths(root: Path) -> tuple[Path, Path]:
    """The engine's storage and its API socket under the stack's home `root`."""
    home = root.absolute()  # the socket's path as bound is what /proc/net/unix shows
    return home / "podman", home / "podman.sock"


def engine_get(docker_host: str, path: str, timeout: float = TIMEOUT_S) -> int | None:
    """The status of a GET of the Docker API's `path` on the engine at `docker_host`
    (`unix://<socket>` or `tcp://host:port`); None when it did not answer."""
    if docker_host.startswith("unix://"):
        sock = docker_host.removeprefix("unix://")
        if not Path(sock).exists():
            return None
        return http_status(f"http://engine{path}", sock, timeout)
    return http_status(re.sub(r"^tcp://", "http://", docker_host).rstrip("/") + path, None, timeout)


def engine_alive(docker_host: str) -> bool:
    """The engine at `docker_host` answers /_ping."""
    return engine_get(docker_host, "/_ping") == 200


def engine_up(root: Path) -> bool:
    """Our podman service holds its socket and answers /_ping there."""
    sock = engine_paths(root)[1]
    return part_listens(root, "engine", socket_path=sock) and engine_alive(f"unix://{sock}")


def image_known(docker_host: str, name: str) -> bool:
    """The engine at `docker_host` has the image `name` (its inspect answers 200)."""
    return engine_get(docker_host, f"/images/{quote(name, safe='/:')}/json", 30) == 200


# --- the served parts ----------------------------------------------------------------


def registry_alive(port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}/v2/")


def registry_up(root: Path, port: int) -> bool:
    """Our docker-registry holds 127.0.0.1:`port` and answers /v2/ there."""
    return part_listens(root, "registry", port=port) and registry_alive(port)


def prefect_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def prefect_up(root: Path, port: int) -> bool:
    """Our Prefect server holds 127.0.0.1:`port` and answers /api/health there."""
    url = prefect_url(port)
    return part_listens(root, "prefect", port=port) and http_ok(f"{url}/health")


def monitor_alive(name: str, port: int) -> bool:
    return http_ok(f"http://127.0.0.1:{port}{READY_PATHS[name]}")


def monitor_up(root: Path, name: str, port: int) -> bool:
    """Our part `name` holds 127.0.0.1:`port` and says it is ready there."""
    return part_listens(root, name, port=port) and monitor_alive(name, port)

"""A real Prefect server of its own (`prefect server start` on a free loopback port), for
tests and benches that need one beside the session's, optionally behind an auth string."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.plugins.lifetime import tied


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served_prefect(home: Path, auth: str | None = None) -> Iterator[str]:
    """Yield the API URL of a server with `home` as PREFECT_HOME, telemetry off; `auth`:
    the auth string it requires (PREFECT_SERVER_API_AUTH_STRING). Stopped on exit."""
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if auth is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            tied([*command, "--port", str(port)]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                msg = f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
                raise RuntimeError(msg)
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)

"""Run the real servicekit app (libs/servicekit) in a subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stack.ports import free_port
from tests.plugins.lifetime import stop, tied

REPO = Path(__file__).resolve().parents[2]
SERVICEKIT_SRC = REPO / "libs" / "servicekit" / "src"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
__all__ = ["DIGEST_A", "DIGEST_B", "free_port", "servicekit_server"]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def servicekit_server(
    workdir: Path, env: dict[str, str] | None = None, *, wait: bool = True
) -> Iterator[str]:
    """Serve `create_app("probe")` with `env` added; yields its base URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "probe_app.py").write_text(
        'from servicekit import create_app\napp = create_app("probe")\n', encoding="utf-8"
    )
    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{workdir}{os.pathsep}{SERVICEKIT_SRC}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ENVIRONMENT": "dev",
        "IMAGE_DIGEST": DIGEST_A,
        "APP_VERSION": "1.2.3",
        **(env or {}),
    }
    log = (workdir / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(
        tied([sys.executable, "-m", "servicekit.serve", "probe_app:app"]),
        cwd=workdir,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while wait and not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                output = (workdir / f"server-{port}.log").read_text(errors="replace")
                raise RuntimeError(f"servicekit server did not start:\n{output}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc, timeout=30)
        log.close()

"""The stack's Prefect server (SQLite under the stack's home) on a loopback port, behind
an auth string of its own.

`ensure_stack_auth` makes the string once (`admin:<random>`, in `<stack dir>/prefect-auth`,
readable by its owner only) and the server runs with it as PREFECT_SERVER_API_AUTH_STRING:
every API call without it is answered 401 (Prefect leaves GET /api/health and /api/ready
open for probes). Its clients send it as PREFECT_API_AUTH_STRING (HTTP basic auth). It
reaches processes through their environment only, never their command line.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

from blocks.stack import StackInfo, load_stack_auth, stack_auth_file
from stack.ports import choose_port, part_listens, recorded_port
from stack.probe import http_ok, prefect_up, prefect_url
from stack.serve import REUSE_PATIENCE_S, reusable, start_on_port
from stack.steps import Steps
from stack.supervisor import environ, running_part, stop_part
from tasks.masking import mask_auth_string
from tasks.process import which

SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
AUTH_USER = "admin"


def ensure_stack_auth(root: Path) -> str:
    """The stack's Prefect auth string: the one in `<root>/prefect-auth`, else a new random
    one written there (mode 0600). A file others may read, or one of another owner, is
    replaced by a new string: the old one may be known."""
    path = stack_auth_file(root)
    current = load_stack_auth(root)
    if current is not None:
        info = path.stat()
        if info.st_uid == os.geteuid() and info.st_mode & 0o077 == 0:
            mask_auth_string(current)
            return current
    auth = f"{AUTH_USER}:{secrets.token_urlsafe(32)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(auth + "\n")
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    mask_auth_string(auth)
    return auth


def _guarded(root: Path, auth: str) -> bool:
    """The running server of `root` was started with `auth` as its auth string."""
    pid = running_part(root, "prefect")
    return pid is not None and environ(pid).get(SERVER_AUTH_ENV) == auth


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def ensure_prefect(root: Path, previous: StackInfo | None, steps: Steps, auth: str) -> str:
    """The stack's server, reused when it runs with `auth` (`ensure_stack_auth`), else
    (re)started with it; its API URL."""
    recorded = recorded_port(previous.prefect_api_url if previous else None)
    if recorded is not None and reusable(
        functools.partial(part_listens, root, "prefect", port=recorded),
        functools.partial(http_ok, f"{prefect_url(recorded)}/health"),
        REUSE_PATIENCE_S,
    ):
        if _guarded(root, auth):
            pid = running_part(root, "prefect")
            steps.info("prefect", f"running at {prefect_url(recorded)} (pid {pid})")
            return prefect_url(recorded)
        steps.info("prefect", "running without the stack's auth string: restarting")
    stop_part(root, "prefect")

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        env = {
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": prefect_url(port),
            # deploy locks' leases survive a server restart (in memory, a slot held
            # across the restart would stay taken for good)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
            # the environment, never argv: the command line is public (ps)
            SERVER_AUTH_ENV: auth,
            CLIENT_AUTH_ENV: auth,
        }
        args = [which("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        return args, env

    port, note = choose_port(recorded, None)
    port = start_on_port(
        root,
        "prefect",
        "Prefect server",
        port,
        note or "its first start migrates the database",
        command,
        lambda p: prefect_up(root, p),
        180,
        steps,
    )
    return prefect_url(port)

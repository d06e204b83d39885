"""The stack's Prefect server (SQLite under the stack's home) on a loopback port."""

from __future__ import annotations

import functools
from pathlib import Path

from blocks.stack import StackInfo
from stack.ports import choose_port, part_listens, recorded_port
from stack.serve import REUSE_PATIENCE_S, http_ok, reusable, start_on_port
from stack.steps import Steps
from stack.supervisor import running_part, stop_part
from tasks.process import which


def prefect_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def prefect_up(root: Path, port: int) -> bool:
    """Our Prefect server holds 127.0.0.1:`port` and answers /api/health there."""
    url = prefect_url(port)
    return part_listens(root, "prefect", port=port) and http_ok(f"{url}/health")


def ensure_prefect(root: Path, previous: StackInfo | None, steps: Steps) -> str:
    recorded = recorded_port(previous.prefect_api_url if previous else None)
    if recorded is not None and reusable(
        functools.partial(part_listens, root, "prefect", port=recorded),
        functools.partial(http_ok, f"{prefect_url(recorded)}/health"),
        REUSE_PATIENCE_S,
    ):
        pid = running_part(root, "prefect")
        steps.info("prefect", f"running at {prefect_url(recorded)} (pid {pid})")
        return prefect_url(recorded)
    stop_part(root, "prefect")

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        env = {
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": prefect_url(port),
            # deploy locks' leases survive a server restart (in memory, a slot held
            # across the restart would stay taken for good)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
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

"""The stack's two trusted workers by role, and whether each runs: no Prefect.

What `cicd stack status` needs of the workers (their parts, pools and pids) lives here,
apart from starting and stopping them (stack/worker.py, which talks to the server with
Prefect's client), so the status answers without importing Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconcile.pools import PROCESS_POOL, PRODUCTION_POOL
from stack.steps import StackPart
from stack.supervisor import cmdline, recorded_pid, running_part


@dataclass(frozen=True)
class WorkerRole:
    """One worker of the stack: its part of the supervisor, its pool, its environments."""

    part: str
    """The supervisor's part name: pid file, log, trust file and audit log are named so."""
    pool: str
    environments: tuple[str, ...]
    """What its trust file lets it deploy into (the credentials it would hold)."""


DEPLOY_WORKER = WorkerRole("worker", PROCESS_POOL, ("dev", "staging"))
PRODUCTION_WORKER = WorkerRole("worker-production", PRODUCTION_POOL, ("production",))
WORKERS = (DEPLOY_WORKER, PRODUCTION_WORKER)


def worker_pid(root: Path, role: WorkerRole = DEPLOY_WORKER) -> int | None:
    """The pid of the worker of `role` that `ensure_worker(root, ...)` started, while it runs.

    A part of the stack's supervisor, checked once more by its command line: a pid the
    kernel has since given to another process does not count.
    """
    pid = running_part(root, role.part)
    if pid is None:
        return None
    args = cmdline(pid)
    if "stack.trusted_worker" not in args or "start" not in args:  # now another process
        return None
    return pid


def worker_parts(root: Path) -> list[StackPart]:
    """Each worker the stack started in `root` (a pid file recorded it), with its pool."""
    return [
        StackPart(
            name=role.part,
            state="running" if worker_pid(root, role) is not None else "stopped",
            address=role.pool,
        )
        for role in WORKERS
        if recorded_pid(root, role.part) is not None
    ]

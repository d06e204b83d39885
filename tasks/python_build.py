"""uv: lock a service's dependencies, export its lock files, sync its own environment.

Each service has its own `.venv` (uv's default project environment), so a service's
checks run against exactly its own locked dependencies and one service's broken
environment fails only that service. uv's shared package cache makes the per-service
environments cheap (packages are linked from the cache, not downloaded again).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from prefect import task

from blocks.catalog import ServiceSpec
from core.errors import CheckFailed, ToolError
from core.records import StageResult
from tasks.forking import warm_fork_server
from tasks.process import STAGE_RETRY_OPTIONS, ToolRun, run_logger, run_tool, which
from tasks.source import service_dir, service_env

UV_TIMEOUT_S = 600
EXPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("requirements.lock", ("--no-dev",)),
    ("requirements-dev.lock", ("--all-groups",)),
)
"""(file, extra `uv export` arguments): runtime and development requirements."""

EXPORT_ARGS = ("export", "--frozen", "--no-hashes", "--no-emit-project", "--quiet")
"""As libs/README.md says; the libs (path sources) are left out with --no-emit-package."""
_RESOLUTION_FAILED = re.compile(r"No solution found|unsatisfiable|Because .* depends on", re.I)


def uv_lock_failure(run: ToolRun) -> bool:
    """True when `uv lock` ran but the requirements cannot be resolved (not worth a retry)."""
    return not run.ok and bool(_RESOLUTION_FAILED.search(run.output))


def lock_commands(service: ServiceSpec, libs: list[str] | None = None) -> list[list[str]]:
    """`uv lock`, then one `uv export` per lock file: the lock stage's commands (uv's args)."""
    no_emit = [
        arg
        for lib in (service.libs if libs is None else libs)
        for arg in ("--no-emit-package", lib)
    ]
    return [
        ["lock"],
        *([*EXPORT_ARGS, *no_emit, *extra, "--output-file", name] for name, extra in EXPORTS),
    ]


SYNC_ARGS = ("sync", "--frozen", "--all-groups")
"""The sync stage's uv arguments."""


def _uv(path: Path, *args: str) -> ToolRun:
    return run_tool([which("uv"), *args], cwd=path, env=service_env(path), timeout=UV_TIMEOUT_S)


@task(task_run_name="lock_service-{service.name}", **STAGE_RETRY_OPTIONS)
def lock_service(service: ServiceSpec, repo: str, libs: list[str] | None = None) -> StageResult:
    """`uv lock` the service, then export requirements.lock and requirements-dev.lock.

    The exports hold only pinned index packages: the monorepo's `libs` (default: the
    service's own) are installed from the source tree, so they are not emitted.

    Raises:
        CheckFailed: the requirements cannot be resolved.
        ToolError: uv could not run (network, index): retried.
    """
    path = service_dir(repo, service)
    started = time.monotonic()
    lock, *exports = lock_commands(service, libs)
    locked = _uv(path, *lock)
    if uv_lock_failure(locked):
        raise CheckFailed(
            service.name,
            "lock",
            "dependencies cannot be resolved",
            locked.excerpt(),
            time.monotonic() - started,
        )
    if not locked.ok:
        msg = f"{service.name}: uv lock failed: {locked.excerpt(10)}"
        raise ToolError(msg)
    for args in exports:
        exported = _uv(path, *args)
        if not exported.ok:
            msg = f"{service.name}: uv export {args[-1]} failed: {exported.excerpt(10)}"
            raise ToolError(msg)
    seconds = time.monotonic() - started
    run_logger().info("%s: locked and exported in %.1fs", service.name, seconds)
    return StageResult(
        service=service.name,
        stage="lock",
        status="passed",
        seconds=round(seconds, 3),
        summary="uv.lock, " + ", ".join(name for name, _ in EXPORTS),
    )


@task(task_run_name="sync_service-{service.name}", **STAGE_RETRY_OPTIONS)
def sync_service(service: ServiceSpec, repo: str) -> StageResult:
    """`uv sync --frozen` the service's own environment (with its dev group: the checkers).

    Raises:
        ToolError: uv could not install the locked packages: retried.
    """
    path = service_dir(repo, service)
    started = time.monotonic()
    synced = _uv(path, *SYNC_ARGS)
    if not synced.ok:
        msg = f"{service.name}: uv sync --frozen failed: {synced.excerpt(10)}"
        raise ToolError(msg)
    seconds = time.monotonic() - started
    run_logger().info("%s: environment synced in %.1fs", service.name, seconds)
    warm_fork_server(repo, path)  # the checkout's first environment starts it (tasks/forking.py)
    return StageResult(
        service=service.name,
        stage="sync",
        status="passed",
        seconds=round(seconds, 3),
        summary=f"{path.name}/.venv",
    )

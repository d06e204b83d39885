"""uv: lock a service's dependencies, export its lock files, sync its own environment.

Each service has its own `.venv` (uv's default project environment), so a service's
checks run against exactly its own locked dependencies and one service's broken
environment fails only that service. uv's shared package cache makes the per-service
environments cheap (packages are linked from the cache, not downloaded again).

A rerun installs nothing it does not need. Every CI run checks out a fresh worktree, so
every environment would be new: the sync stage first asks whether any stage that uses
the environment will run (each is cached by the service's fingerprint), and syncs only
then. Likewise a lock that changed nothing is recorded by the content it ran on (under
the state dir), and the same content later is not locked again.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.catalog import ServiceSpec
from blocks.config import state_dir
from core.catalog import Catalog
from core.errors import CheckFailed, ToolError
from core.records import StageResult
from tasks.forking import warm_fork_server
from tasks.process import STAGE_RETRY_OPTIONS, ToolRun, run_logger, run_tool, which
from tasks.source import StageCall, lib_dependencies, service_dir, service_env
from tasks.source import fingerprint as content_fingerprint

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


def lock_record(
    repo: str | Path,
    service: ServiceSpec,
    catalog: Catalog | None,
    tool_versions: Mapping[str, str] | None,
) -> Path | None:
    """Where a lock of `service` that changed nothing at the checkout's present content is
    recorded: named by its fingerprint (every file `uv lock` reads or writes is in it, the
    uv version too) and the lock's commands. None without a catalog and tool versions."""
    if catalog is None or tool_versions is None:
        return None
    commands = lock_commands(service, lib_dependencies(catalog, service))
    content = content_fingerprint(repo, service, catalog, tool_versions)
    digest = hashlib.sha256(content.encode())
    digest.update(repr(commands).encode())
    return state_dir() / "cache" / "locked" / digest.hexdigest()


def _record(path: Path, summary: str) -> None:
    """Write `path` whole or not at all (a concurrent run may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(summary + "\n")
    Path(partial).replace(path)


def _lock(path: Path, service: ServiceSpec, libs: list[str] | None) -> None:
    """`uv lock`, then the exports (see `lock_service`)."""
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


LOCK_SUMMARY = "uv.lock, " + ", ".join(name for name, _ in EXPORTS)


@task(task_run_name="lock_service-{service.name}", cache_policy=NO_CACHE, **STAGE_RETRY_OPTIONS)
def lock_service(
    service: ServiceSpec,
    repo: str,
    libs: list[str] | None = None,
    catalog: Catalog | None = None,
    tool_versions: Mapping[str, str] | None = None,
    reuse: bool = True,
) -> StageResult:
    """`uv lock` the service, then export requirements.lock and requirements-dev.lock.

    The exports hold only pinned index packages: the monorepo's `libs` (default: the
    service's own) are installed from the source tree, so they are not emitted.

    With the `catalog` and the `tool_versions` of the fingerprint, a lock that changed
    nothing is recorded (`lock_record`), and with `reuse` a recorded one is not run again:
    the files are already what it would write ("cached").

    Raises:
        CheckFailed: the requirements cannot be resolved.
        ToolError: uv could not run (network, index): retried.
    """
    path = service_dir(repo, service)
    started = time.monotonic()
    record = lock_record(repo, service, catalog, tool_versions)
    if reuse and record is not None and record.is_file():
        run_logger().info("%s: lock files current (recorded at this content)", service.name)
        return StageResult(
            service=service.name, stage="lock", status="cached", summary=LOCK_SUMMARY
        )
    _lock(path, service, libs)
    if record is not None and lock_record(repo, service, catalog, tool_versions) == record:
        _record(record, f"{service.name}: {LOCK_SUMMARY}")  # the lock changed nothing
    seconds = time.monotonic() - started
    run_logger().info("%s: locked and exported in %.1fs", service.name, seconds)
    return StageResult(
        service=service.name,
        stage="lock",
        status="passed",
        seconds=round(seconds, 3),
        summary=LOCK_SUMMARY,
    )


@task(task_run_name="sync_service-{service.name}", cache_policy=NO_CACHE, **STAGE_RETRY_OPTIONS)
def sync_service(
    service: ServiceSpec,
    repo: str,
    fingerprint: str = "",
    needed_by: Sequence[StageCall] = (),
) -> StageResult:
    """`uv sync --frozen` the service's own environment (with its dev group: the checkers).

    Not when every stage of `needed_by` (those that use the environment) takes its result
    from the cache at `fingerprint`: nothing would use the environment ("cached"; no
    fork server is started either).

    Raises:
        ToolError: uv could not install the locked packages: retried.
    """
    path = service_dir(repo, service)
    if fingerprint and needed_by and all(call.cached(fingerprint) for call in needed_by):
        stages = ", ".join(call.stage for call in needed_by)
        run_logger().info("%s: environment not needed: %s cached", service.name, stages)
        return StageResult(
            service=service.name,
            stage="sync",
            status="cached",
            summary=f"not needed: {stages} cached",
        )
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

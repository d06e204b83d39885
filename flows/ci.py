"""The CI flow (the seed's Jenkinsfile): change detection, lock, sync, checks, tests.

Per service: lock -> sync -> (ruff, mypy, bandit in parallel) -> pytest -> delivery
(when asked). Every service runs as its own branch of task runs: a failing service
fails only its own branch, the others carry on. The work is submitted stage by stage
across all services, so the bounded thread pool picks it up in pipeline order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from prefect import Task, flow
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import NotSet
from pydantic import BaseModel, Field

from blocks.catalog import ServiceSpec
from blocks.config import load_config, repo_root, state_dir
from tasks.delivery import (
    DeliverySettings,
    delivery_settings,
    deploy_service,
    image_version,
    publish_image,
    record_release,
    verify_deployment,
)
from tasks.models import StageResult
from tasks.python_build import lock_service, sync_service
from tasks.quality import run_bandit, run_mypy, run_ruff
from tasks.reports import failed_services, publish_ci_artifacts, stage_outcome
from tasks.security import generate_sbom, scan_dependencies
from tasks.source import (
    current_commit,
    detect_changes,
    fingerprint_service,
    get_tool_versions,
    lib_dependencies,
)
from tasks.testing import run_pytest

CHECKS: tuple[tuple[str, Task[..., StageResult]], ...] = (
    ("mypy", run_mypy),  # the slowest first: it starts before the quick ones queue up
    ("ruff", run_ruff),
    ("bandit", run_bandit),
)

StageFutures = dict[tuple[str, str], PrefectFuture[Any]]


class CiOutcome(BaseModel):
    """What a CI run found."""

    commit: str = Field(default="", description="The commit checked (HEAD of the checkout)")
    affected: list[str] = Field(default_factory=list, description="Services the run checked")
    results: list[StageResult] = Field(default_factory=list, description="Every stage's result")
    failed: dict[str, str] = Field(
        default_factory=dict, description="Failed service -> 'stage: summary'"
    )
    nothing_to_do: bool = Field(default=False, description="No service was affected")
    message: str = Field(default="", description="One line on the run")


def _delivery_stages(
    spec: ServiceSpec,
    repo: str,
    checks_passed: list[PrefectFuture[Any]],
    *,
    version: str,
    commit: str,
    settings: DeliverySettings,
    environment: str,
    config_source: str | None,
    rebuild: bool,
) -> StageFutures:
    """The seed's Docker build, security scan, push, dev deploy and health check.

    They run for a service only after all its checks passed; each waits for the one
    before it, so a failure skips the rest of that service's delivery.
    """
    image = publish_image.submit(
        spec,
        repo,
        version,
        commit,
        settings,
        rebuild=rebuild,
        wait_for=checks_passed,
        return_state=False,
    )
    refresh: bool | type[NotSet] = True if rebuild else NotSet
    scan = scan_dependencies.with_options(refresh_cache=refresh).submit(
        spec, Path(repo), wait_for=checks_passed, return_state=False
    )
    sbom = generate_sbom.with_options(refresh_cache=refresh).submit(
        image, state_dir() / "sbom", return_state=False
    )
    deployed = deploy_service.submit(
        environment, spec, image, config_source=config_source, wait_for=[scan], return_state=False
    )
    health = verify_deployment.submit(deployed, spec, return_state=False)
    record = record_release.submit(deployed, scan, wait_for=[health], return_state=False)
    return {
        (spec.name, "image"): image,
        (spec.name, "scan"): scan,
        (spec.name, "sbom"): sbom,
        (spec.name, "deploy"): deployed,
        (spec.name, "health"): health,
        (spec.name, "record"): record,
    }


def bounded_runner(max_workers: int | None = None) -> TaskRunner[PrefectFuture[Any]]:
    """A thread pool of `max_workers` (default: the cores); more tool processes is slower."""
    runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(
        max_workers=max_workers or os.cpu_count() or 2
    )
    return cast("TaskRunner[PrefectFuture[Any]]", runner)  # TaskRunner is invariant in F


@flow(
    name="ci",
    task_runner=bounded_runner(),
    log_prints=False,
)
def ci(
    services: list[str] | None = None,
    all_services: bool = False,
    base: str = "HEAD~1",
    head: str = "HEAD",
    no_cache: bool = False,
    deliver: bool = False,
    environment: str = "dev",
    config_source: str | None = None,
    repo: str | None = None,
) -> CiOutcome | State[Any]:
    """Check the services a change affects (or those named, or all of them).

    Args:
        services: check these services; skips change detection.
        all_services: check every service; skips change detection.
        base: change detection compares `base..head`.
        head: change detection compares `base..head`.
        no_cache: rerun every stage even when the service's fingerprint is unchanged.
        deliver: after the checks pass, run the delivery stages for `environment`.
        environment: where delivery deploys.
        config_source: "blocks", a configuration file, or None for the default.
        repo: the monorepo checkout; default ELICE_REPO or this checkout.

    Returns:
        The CiOutcome; a Failed state listing "service: stage failed: summary" per
        failed service when any failed (after the artifacts are published).
    """
    logger = get_run_logger()
    cfg = load_config(config_source)
    cfg.environment(environment)
    root = str(repo or repo_root())
    commit = current_commit(root)
    if services:
        names = [s.name for s in cfg.catalog.select(services)]
    elif all_services:
        names = cfg.catalog.names()
    else:
        names = detect_changes(root, base, head, cfg.catalog)
    if not names:
        message = f"nothing to do: no service is affected by {base}..{head}"
        logger.info(message)
        return CiOutcome(commit=commit, nothing_to_do=True, message=message)
    specs = cfg.catalog.select(names)
    logger.info("CI of %s at %s: %s", root, commit[:12], ", ".join(names))

    refresh: bool | type[NotSet] = True if no_cache else NotSet
    checks = [(stage, check.with_options(refresh_cache=refresh)) for stage, check in CHECKS]
    pytest_task = run_pytest.with_options(refresh_cache=refresh)
    versions = get_tool_versions()

    stages: StageFutures = {}
    locks = {s.name: lock_service.submit(s, root, lib_dependencies(cfg.catalog, s)) for s in specs}
    prints = {
        s.name: fingerprint_service.submit(
            root, s, cfg.catalog, versions, wait_for=[locks[s.name]], return_state=False
        )
        for s in specs
    }
    syncs = {
        s.name: sync_service.submit(s, root, wait_for=[locks[s.name]], return_state=False)
        for s in specs
    }
    for s in specs:
        stages[s.name, "lock"] = locks[s.name]
        stages[s.name, "sync"] = syncs[s.name]
    for s in specs:
        for stage, check in checks:
            stages[s.name, stage] = check.submit(
                s, root, fingerprint=prints[s.name], wait_for=[syncs[s.name]], return_state=False
            )
    for s in specs:
        stages[s.name, "pytest"] = pytest_task.submit(
            s,
            root,
            s.coverage_threshold,
            fingerprint=prints[s.name],
            wait_for=[stages[s.name, stage] for stage, _ in checks],
            return_state=False,
        )
    if deliver:  # delivery: image, scan, push, deploy, health, ledger
        settings = delivery_settings()
        for s in specs:
            prints[s.name].wait()
            if not prints[s.name].state.is_completed():
                continue
            stages.update(
                _delivery_stages(
                    s,
                    root,
                    [stages[s.name, "pytest"]],
                    version=image_version(root, s, prints[s.name].result()),
                    commit=commit,
                    settings=settings,
                    environment=environment,
                    config_source=config_source,
                    rebuild=no_cache,
                )
            )

    results = []
    for s in specs:
        prints[s.name].wait()
        if not prints[s.name].state.is_completed():
            results.append(stage_outcome(s.name, "fingerprint", prints[s.name].state))
    for (service, stage), future in stages.items():
        future.wait()
        results.append(stage_outcome(service, stage, future.state))
    results.sort(key=lambda r: names.index(r.service))

    failed = failed_services(results)
    summary = publish_ci_artifacts(results)
    outcome = CiOutcome(
        commit=commit,
        affected=names,
        results=results,
        failed={name: f"{r.stage}: {r.summary}" for name, r in failed.items()},
        message=summary,
    )
    if failed:
        lines = [f"{name}: {r.stage} failed: {r.summary}" for name, r in failed.items()]
        return Failed(
            message=f"CI failed for {len(failed)} of {len(names)} services:\n" + "\n".join(lines),
            data=outcome,
        )
    return outcome

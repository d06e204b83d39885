"""The CI flow (the seed's Jenkinsfile): change detection, lock, sync, checks, tests.

Per service: lock -> sync -> (ruff, mypy, bandit in parallel) -> pytest -> delivery
(when asked). Every service runs as its own branch of task runs: a failing service
fails only its own branch, the others carry on. The work is submitted stage by stage
across all services, so the bounded thread pool picks it up in pipeline order.
A rerun of unchanged content locks and syncs nothing: its lock files are recorded
current and every check is cached by the fingerprint, so no environment is needed.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, cast

from prefect import Flow, Task, flow
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import MissingResult, UnfinishedRun
from prefect.filesystems import WritableFileSystem
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import NotSet, allow_failure

from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig, state_dir
from blocks.environments import EnvironmentSpec
from blocks.repository import GitRepository, pinned_repository
from blocks.storage import ledger_filesystem
from core.errors import CiFailed, ConfigError
from core.records import CiOutcome, StageResult, Workspace
from core.settings import Settings
from tasks.deploy import deploy_service, settle_record
from tasks.deploy.target import DeployTarget, environment_target
from tasks.deployment_check import refuse_local_only
from tasks.dispatch import SERVICE_DEPLOYMENT, collect_service_runs, start_service_runs
from tasks.forking import stop_fork_servers
from tasks.github.report import ci_status_hook
from tasks.health import verify_deployment
from tasks.images import (
    DeliverySettings,
    build_arguments,
    build_image,
    delivery_settings,
    image_version,
    publish_image,
)
from tasks.notify import Notice, flow_run_url, notify
from tasks.process import set_tool_slots
from tasks.python_build import lock_service, sync_service
from tasks.quality import run_bandit, run_mypy, run_ruff
from tasks.releases import record_release
from tasks.reports import failed_services, publish_ci_artifacts, stage_outcome
from tasks.security import generate_sbom, scan_dependencies
from tasks.source import (
    StageCall,
    detect_changes,
    fingerprint_service,
    get_tool_versions,
    lib_dependencies,
)
from tasks.testing import run_pytest
from tasks.trusted import pipeline_config
from tasks.workspace import prepare_workspace, remove_workspace, use_checkout

CHECKS: tuple[tuple[str, Task[..., StageResult]], ...] = (
    ("mypy", run_mypy),  # the slowest first: it starts before the quick ones queue up
    ("ruff", run_ruff),
    ("bandit", run_bandit),
)

StageFutures = dict[tuple[str, str], PrefectFuture[Any]]


def _build_and_scan(
    spec: ServiceSpec,
    repo: str,
    checks_passed: list[PrefectFuture[Any]],
    arguments: dict[str, Any],
    refresh: bool | type[NotSet],
) -> StageFutures:
    """A commit that does not ship: its image built and its dependencies scanned, no more."""
    built = build_image.submit(spec, **arguments, wait_for=checks_passed, return_state=False)
    scanned = scan_dependencies.with_options(refresh_cache=refresh).submit(
        spec, Path(repo), wait_for=checks_passed, return_state=False
    )
    return {(spec.name, "image"): built, (spec.name, "scan"): scanned}


def _delivery_stages(
    spec: ServiceSpec,
    repo: str,
    checks_passed: list[PrefectFuture[Any]],
    *,
    version: str,
    commit: str,
    settings: DeliverySettings,
    env: EnvironmentSpec,
    deploy_target: DeployTarget,
    rebuild: bool,
    workspace: Workspace,
    ships: bool,
    user: Settings,
    ledger: WritableFileSystem | None,
    repository: GitRepository,
) -> StageFutures:
    """The seed's Docker build, security scan, push, dev deploy and health check.

    They run for a service only after all its checks passed; each waits for the one
    before it, so a failure skips the rest of that service's delivery. A commit that
    does not ship gets its image built and scanned, and nothing after that.
    """
    refresh: bool | type[NotSet] = True if rebuild else NotSet
    if not ships or ledger is None:  # a shipping run always resolved its ledger
        arguments = build_arguments(spec, repo, version, commit, settings)
        return _build_and_scan(spec, repo, checks_passed, arguments, refresh)
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
    scan = scan_dependencies.with_options(refresh_cache=refresh).submit(
        spec, Path(repo), wait_for=checks_passed, return_state=False
    )
    sbom = generate_sbom.with_options(refresh_cache=refresh).submit(
        image, state_dir(user) / "sbom", registry=settings.registry, return_state=False
    )
    deployed = deploy_service.submit(
        deploy_target, env, spec, image, wait_for=[scan], return_state=False
    )
    health = verify_deployment.submit(deployed, spec, return_state=False)
    recorded = record_release.submit(
        deployed, scan, workspace, ledger, repository, wait_for=[health], return_state=False
    )
    # the record stage: a release the ledger does not name is taken back out of dev
    record = settle_record.submit(
        deploy_target,
        env,
        spec,
        deployed,
        allow_failure(recorded),
        wait_for=[health],
        return_state=False,
    )
    return {
        (spec.name, "image"): image,
        (spec.name, "scan"): scan,
        (spec.name, "sbom"): sbom,
        (spec.name, "deploy"): deployed,
        (spec.name, "health"): health,
        (spec.name, "record"): record,
    }


def ci_outcome(state: State[Any]) -> CiOutcome | None:
    """What a `ci` run found, read from its final state: the one way every caller reads it.

    A passing run's result is its CiOutcome; a run whose services failed ends Failed with
    a CiFailed carrying it. None for a run that checked nothing (it failed before: bad
    input, an unreadable repository; or crashed), and for a state read back from the API
    (the flow keeps its result in the process that ran it).
    """
    try:
        value = state.result(raise_on_failure=False)
    except (MissingResult, UnfinishedRun):
        return None
    if isinstance(value, CiFailed):
        return value.outcome
    return value if isinstance(value, CiOutcome) else None


class _ReportedFailure(logging.Filter):
    """Keeps the flow engine's re-raise of a CI run's reported failure out of its logs.

    Prefect 3.9's engine hands a Failed run's exception back to its caller. Where a worker
    runs the flow (`python -m prefect.engine`) that re-raise is logged, traceback and all,
    as "Engine execution exited with unexpected exception", although the run has already
    ended Failed with its one-line message and the process exits 0. A CiFailed is that
    expected end, not a crash: its record is dropped. Every other exception still logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, CiFailed)


_REPORTED_FAILURE = _ReportedFailure()
FLOW_RUN_LOGGER = "prefect.flow_runs"
"""The logger of the engine's flow-run messages (`prefect.logging.loggers.flow_run_logger`)."""


def ci_failed(outcome: CiOutcome, failed: dict[str, StageResult]) -> State[Any]:
    """The end of a run whose services failed: Failed, one line, a CiFailed carrying `outcome`.

    The line lists "service: stage failed: summary" for each failed service. The state is
    returned, not raised: a raised error is logged with its traceback as the run ends, and
    an outcome as a failed state's data is no exception (reading the result raises
    TypeError, which a worker logs as a crash).
    """
    each = "; ".join(
        f"{name}: {r.stage} failed: {' '.join(r.summary.split())}" for name, r in failed.items()
    )
    message = f"CI failed for {len(failed)} of {len(outcome.affected)} services: {each}"
    logging.getLogger(FLOW_RUN_LOGGER).addFilter(_REPORTED_FAILURE)  # once: addFilter dedupes
    return Failed(message=message, data=CiFailed(message, outcome))


def notify_ci_failed(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """on_failure / on_crashed: Slack hears of a failed CI run of the protected branch.

    That covers pushes to main, the nightly rebuild and runs started from the UI with
    their defaults; a pull request's failure is its author's to see in GitHub.
    """
    params = flow_run.parameters or {}
    outcome = ci_outcome(state)
    if outcome is not None:
        if not outcome.protected:
            return
        what = f"{outcome.commit[:12]} ({outcome.ref})"
    else:
        ref = str(params.get("ref") or "")
        if ref.startswith("refs/pull/"):
            return
        what = str(params.get("head") or "HEAD")
    notify(
        Notice(
            kind="failed",
            environment=str(params.get("environment") or "dev"),
            release_id=what,
            flow_run_url=flow_run_url(str(flow_run.id)),
            message=f"{flow_run.name}: {state.message or flow.name + ' failed'}",
        ),
        pagerduty=None,
    )


# Threads for a CI run's tasks: more than every stage of 12 services (about 14 each), so a
# ready task never queues behind waiting ones. A waiting thread costs no CPU.
POOL_THREADS = 256


class BoundedTaskRunner(ThreadPoolTaskRunner[Any]):
    """A wide thread pool whose tools run at most `tool_slots` at once (`tasks.process`).

    A task waiting for the one before it holds a thread, never a tool slot: with a pool
    as narrow as the cores, waiting tasks took the threads and a ready image build
    queued behind them.
    """

    def __init__(self, tool_slots: int) -> None:
        super().__init__(max_workers=POOL_THREADS)
        self.tool_slots = tool_slots

    def duplicate(self) -> BoundedTaskRunner:
        return type(self)(self.tool_slots)

    def __enter__(self) -> BoundedTaskRunner:
        set_tool_slots(self.tool_slots)
        super().__enter__()
        return self


def bounded_runner(max_workers: int | None = None) -> TaskRunner[PrefectFuture[Any]]:
    """Tasks run on a wide thread pool; tools run `max_workers` at once (default: the
    cores; more tool processes than cores is slower)."""
    runner = BoundedTaskRunner(max_workers or os.cpu_count() or 2)
    return cast("TaskRunner[PrefectFuture[Any]]", runner)  # TaskRunner is invariant in F


def _check_calls(
    root: str, specs: list[ServiceSpec], *, no_cache: bool
) -> dict[str, tuple[list[StageCall], StageCall]]:
    """Each service's checks and its pytest, as they are submitted (their fingerprint to come)."""
    refresh: bool | type[NotSet] = True if no_cache else NotSet
    checks = [(stage, check.with_options(refresh_cache=refresh)) for stage, check in CHECKS]
    pytest_task = run_pytest.with_options(refresh_cache=refresh)
    return {
        s.name: (
            [StageCall.of(stage, check, s, root) for stage, check in checks],
            StageCall.of("pytest", pytest_task, s, root, s.coverage_threshold),
        )
        for s in specs
    }


def _submit_checks(
    cfg: PipelineConfig, root: str, specs: list[ServiceSpec], *, no_cache: bool
) -> tuple[StageFutures, dict[str, PrefectFuture[str]]]:
    """Lock, sync, the checks and pytest of every service, submitted stage by stage across
    the services; the stages' futures and each service's fingerprint.

    The sync stage waits for the fingerprint: a service whose every check is cached at it
    gets no environment (`sync_service`), and a lock that changed nothing at the same
    content before is not run again (`lock_service`; `no_cache` runs both)."""
    versions = get_tool_versions()
    stages: StageFutures = {}
    locks = {
        s.name: lock_service.submit(
            s, root, lib_dependencies(cfg.catalog, s), cfg.catalog, versions, reuse=not no_cache
        )
        for s in specs
    }
    prints = {
        s.name: fingerprint_service.submit(
            root, s, cfg.catalog, versions, wait_for=[locks[s.name]], return_state=False
        )
        for s in specs
    }
    calls = _check_calls(root, specs, no_cache=no_cache)
    for s in specs:
        checks, pytest_call = calls[s.name]
        stages[s.name, "lock"] = locks[s.name]
        stages[s.name, "sync"] = sync_service.submit(
            s, root, prints[s.name], [*checks, pytest_call], return_state=False
        )
    for s in specs:
        for call in calls[s.name][0]:
            stages[s.name, call.stage] = call.submit(prints[s.name], [stages[s.name, "sync"]])
    for s in specs:
        checks, call = calls[s.name]
        waits = [stages[s.name, c.stage] for c in checks]
        stages[s.name, "pytest"] = call.submit(prints[s.name], waits)
    return stages, prints


def _submit_deliveries(
    env: EnvironmentSpec,
    workspace: Workspace,
    specs: list[ServiceSpec],
    stages: StageFutures,
    prints: dict[str, PrefectFuture[str]],
    *,
    no_cache: bool,
    ships: bool,
    user: Settings,
    repository: GitRepository,
) -> None:
    """Image and scan of every fingerprinted service (+ push, SBOM, deploy, health, ledger
    when it ships), added to `stages`. `user`: the settings the run read at its start;
    `repository`: the pinned one, which a release's commit is checked against again."""
    # the deploy environment's registry and target, the engine, the ledger: once a run
    roots = user.trust_roots()
    settings = delivery_settings(user.docker_host, env, roots)
    deploy_target = environment_target(
        env, registries=[settings.registry], docker_host=user.docker_host, roots=roots
    )
    ledger = ledger_filesystem(user) if ships else None
    for s in specs:
        prints[s.name].wait()
        if not prints[s.name].state.is_completed():
            continue
        stages.update(
            _delivery_stages(
                s,
                workspace.path,
                [stages[s.name, "pytest"]],
                version=image_version(workspace.path, s, prints[s.name].result()),
                commit=workspace.commit,
                settings=settings,
                env=env,
                deploy_target=deploy_target,
                rebuild=no_cache,
                workspace=workspace,
                ships=ships,
                user=user,
                ledger=ledger,
                repository=repository,
            )
        )


def _stage_results(
    specs: list[ServiceSpec], stages: StageFutures, prints: dict[str, PrefectFuture[str]]
) -> list[StageResult]:
    """Every stage's result once it ended (a failed fingerprint as a stage of its own)."""
    results: list[StageResult] = []
    for s in specs:
        prints[s.name].wait()
        if not prints[s.name].state.is_completed():
            results.append(stage_outcome(s.name, "fingerprint", prints[s.name].state))
    for (service, stage), future in stages.items():
        future.wait()
        results.append(stage_outcome(service, stage, future.state))
    return results


def run_stages(
    cfg: PipelineConfig,
    env: EnvironmentSpec,
    workspace: Workspace,
    specs: list[ServiceSpec],
    *,
    no_cache: bool,
    deliver: bool,
    user: Settings,
    repository: GitRepository,
) -> list[StageResult]:
    """Every stage of `specs` in `workspace`, on this run's task runner; their results.

    Submitted stage by stage across the services, so the bounded pool picks the work up
    in pipeline order; a failing service fails only its own branch.
    """
    stages, prints = _submit_checks(cfg, workspace.path, specs, no_cache=no_cache)
    if deliver:
        ships = workspace.protected
        _submit_deliveries(
            env,
            workspace,
            specs,
            stages,
            prints,
            no_cache=no_cache,
            ships=ships,
            user=user,
            repository=repository,
        )
    results = _stage_results(specs, stages, prints)
    stop_fork_servers(workspace.path)  # the fork server of this checkout (tasks/forking.py)
    return results


def _fan_out(
    names: list[str],
    workspace: Workspace,
    *,
    no_cache: bool,
    deliver: bool,
    env: EnvironmentSpec,
    config_source: str | None,
) -> list[StageResult]:
    """Each service's branch as its own run of the `ci-service` deployment, on any worker."""
    parameters = {
        "head": workspace.commit,
        "ref": workspace.ref,
        "no_cache": no_cache,
        "deliver": deliver,
        "environment": env.name,
        "config_source": config_source,
    }
    runs = start_service_runs(SERVICE_DEPLOYMENT, names, parameters)
    return collect_service_runs(runs)


@flow(name="ci-service", task_runner=bounded_runner(), log_prints=False, persist_result=True)
def ci_service(
    service: str,
    head: str,
    ref: str | None = None,
    no_cache: bool = False,
    deliver: bool = False,
    environment: str = "dev",
    config_source: str | None = None,
) -> list[StageResult]:
    """One service's branch of a CI run, in a worktree of its own at exactly `head`.

    The `ci` flow with `fan_out` starts one of these per affected service through the
    `ci-service` deployment, so the work spreads over every worker of the pool.
    """
    user = Settings.from_environ()
    refuse_local_only(user, {"config_source": config_source})  # rewritten since the check?
    source = pinned_repository(user)
    cfg = pipeline_config(user, config_source)
    env = cfg.environment(environment)
    specs = cfg.catalog.select([service])
    workspace = prepare_workspace(source, head, ref)
    try:
        get_run_logger().info(
            "%s at %s on %s, worker pid %d",
            service,
            workspace.commit[:12],
            socket.gethostname(),
            os.getppid(),
        )
        return run_stages(
            cfg,
            env,
            workspace,
            specs,
            no_cache=no_cache,
            deliver=deliver,
            user=user,
            repository=source,
        )
    finally:
        remove_workspace(workspace)


report_to_github = ci_status_hook(ci_outcome)  # inert without the elice-github block


@flow(
    name="ci",
    task_runner=bounded_runner(),
    log_prints=False,
    on_completion=[report_to_github],
    on_failure=[notify_ci_failed, report_to_github],
    on_crashed=[notify_ci_failed, report_to_github],
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
    repository: str | None = None,
    ref: str | None = None,
    fan_out: bool = False,
) -> CiOutcome | State[Any]:
    """Check the services a change affects (or those named, or all of them).

    The run checks exactly `head`: a worktree of its own, fetched from the configured
    repository (the `elice-repository` block, else this checkout). Only a commit on the
    protected branch ships (deploys, enters the ledger); any other is checked and its
    images built, and nothing else.

    Args:
        services: check these services; skips change detection.
        all_services: check every service; skips change detection.
        base: change detection compares `base..head` ("HEAD~1": the commit before head).
        head: the commit to check: a SHA, a branch, or "HEAD" (the protected branch's tip).
        no_cache: rerun every stage even when the service's fingerprint is unchanged.
        deliver: after the checks pass, run the delivery stages for `environment`.
        environment: where delivery deploys.
        config_source: "blocks", a configuration file, or None for the default.
        repo: check this local checkout in place instead of a fresh worktree (development).
        repository: the repository GitHub Actions names (owner/name); must be the configured one.
        ref: the ref that triggered the run (refs/heads/main, refs/pull/7/merge), for the record.
        fan_out: run each service's branch as its own `ci-service` deployment run, on
            whichever workers of the pool are free (scale-out); else in this run.

    Returns:
        The CiOutcome; when a service failed (after the artifacts are published), a
        Failed state whose one-line message lists "service: stage failed: summary" per
        failed service, and whose result is a CiFailed carrying the CiOutcome. Read it
        with `ci_outcome(state)`.
    """
    user = Settings.from_environ()
    refuse_local_only(user, {"repo": repo, "config_source": config_source})
    source = _configured_repository(user, repository)
    cfg = pipeline_config(user, config_source)
    env = cfg.environment(environment)
    args = (services, all_services, base, no_cache, deliver)
    if repo:
        if fan_out:
            msg = "fan_out needs the configured repository: service runs fetch their own commit"
            raise ConfigError(msg)
        checkout = use_checkout(source, repo, ref)
        return _check(cfg, env, checkout, *args, user=user, repository=source)
    workspace = prepare_workspace(source, head, ref)
    try:
        return _check(
            cfg,
            env,
            workspace,
            *args,
            user=user,
            repository=source,
            fan_out=fan_out,
            config_source=config_source,
        )
    finally:
        remove_workspace(workspace)


def _configured_repository(user: Settings, repository: str | None) -> GitRepository:
    """The pinned repository; ConfigError when `repository` (GitHub's name) is another."""
    source = pinned_repository(user)
    if repository and repository not in (source.name, source.url):
        msg = f"repository {repository!r} is not the configured one ({source.label})"
        raise ConfigError(msg)
    return source


def _affected(
    cfg: PipelineConfig,
    workspace: Workspace,
    services: list[str] | None,
    all_services: bool,
    base: str,
) -> list[str]:
    """The services this run checks: the named ones, all, or those `base..commit` affects."""
    if services:
        return [s.name for s in cfg.catalog.select(services)]
    if all_services:
        return cfg.catalog.names()
    return detect_changes(workspace.path, base, workspace.commit, cfg.catalog)


def _announce(workspace: Workspace, names: list[str], *, deliver: bool) -> None:
    logger = get_run_logger()
    commit = workspace.commit[:12]
    logger.info("CI of %s at %s: %s", workspace.repository, commit, ", ".join(names))
    if deliver and not workspace.protected:
        logger.info(
            "%s is not on %s: checks and images only; nothing is deployed or recorded",
            commit,
            workspace.protected_branch,
        )


def _outcome(
    workspace: Workspace, names: list[str], results: list[StageResult], *, ships: bool
) -> CiOutcome | State[Any]:
    """The run's outcome, its report published; Failed (carrying it) when a service failed."""
    results.sort(key=lambda r: names.index(r.service))
    failed = failed_services(results)
    summary = publish_ci_artifacts(results)
    outcome = CiOutcome(
        commit=workspace.commit,
        ref=workspace.ref,
        protected=workspace.protected,
        shipped=ships,
        affected=names,
        results=results,
        failed={name: f"{r.stage}: {r.summary}" for name, r in failed.items()},
        message=summary,
    )
    if failed:
        return ci_failed(outcome, failed)
    return outcome


def _check(
    cfg: PipelineConfig,
    env: EnvironmentSpec,
    workspace: Workspace,
    services: list[str] | None,
    all_services: bool,
    base: str,
    no_cache: bool,
    deliver: bool,
    *,
    user: Settings,
    repository: GitRepository,
    fan_out: bool = False,
    config_source: str | None = None,
) -> CiOutcome | State[Any]:
    """The stages of one CI run in `workspace`; `repository`: the pinned one."""
    names = _affected(cfg, workspace, services, all_services, base)
    if not names:
        message = f"nothing to do: no service is affected by {base}..{workspace.commit[:12]}"
        get_run_logger().info(message)
        return CiOutcome(
            commit=workspace.commit,
            ref=workspace.ref,
            protected=workspace.protected,
            nothing_to_do=True,
            message=message,
        )
    _announce(workspace, names, deliver=deliver)
    if fan_out:
        results = _fan_out(
            names,
            workspace,
            no_cache=no_cache,
            deliver=deliver,
            env=env,
            config_source=config_source,
        )
    else:
        specs = cfg.catalog.select(names)
        results = run_stages(
            cfg,
            env,
            workspace,
            specs,
            no_cache=no_cache,
            deliver=deliver,
            user=user,
            repository=repository,
        )
    return _outcome(workspace, names, results, ships=deliver and workspace.protected)

"""A promotion's deploy: the changed services in waves of the machine's cores, then every
service verified healthy on its new digest and measured against its previous baseline.

    deploy_wave_size(configured)                         services deployed at once
    deploy_in_waves(target, env, specs, plan, live, ...) the waves; the first failure raised
    verify_release(addresses, specs, plan, previous, policy, analysis)
                                                         health, baselines, regressions, analysis
    return_to_previous(target, env, specs, state, ...)  a rollback, intent first
    trial_removed_on_failure(remove, stopped, head, tail) a trial's (canary, green) failure
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from prefect import unmapped
from prefect.filesystems import WritableFileSystem

from blocks.catalog import ServiceSpec
from blocks.config import PerformancePolicy
from blocks.environments import EnvironmentSpec
from core.errors import PromotionError, PromotionRefused, PromotionRolledBack
from core.ledger import EnvironmentState
from core.records import DeployedService, PromotionPlan
from tasks.analysis import AnalysisRun, analyse_release
from tasks.deploy import (
    confirm_restored,
    deploy_release,
    restore_environment,
    restore_service,
    rollback_message,
)
from tasks.deploy.target import DeployTarget
from tasks.health import check_service_health
from tasks.locks import check_deploy_lock
from tasks.performance import Baseline, baseline_from_record, check_regression, measure_baseline
from tasks.process import run_logger
from tasks.releases import begin_rollback, end_deploys, finish_rollback

VERIFY_DEADLINE_S = 30


def deploy_wave_size(configured: str = "") -> int:
    """How many services deploy at once: the machine's cores; `configured` (the user
    setting ELICE_DEPLOY_WAVE) overrides, 1 deploys one after another."""
    configured = configured.strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            msg = f"ELICE_DEPLOY_WAVE must be a positive integer, got {configured!r}"
            raise PromotionRefused(msg)
        return int(configured)
    return max(1, os.cpu_count() or 1)


ROLLOUT_TARGETS = {"blue-green": "docker", "canary": "kubernetes"}
"""The one target each progressive rollout is built for."""


def takes_rollout(
    run: AnalysisRun | None, deploy_target: DeployTarget, env: EnvironmentSpec, rollout: str
) -> bool:
    """Whether `env`'s analysis asks for `rollout` (blue-green, canary), which is built for
    one target only (`ROLLOUT_TARGETS`), checked before anything changes.

    Raises:
        PromotionRefused: the rollout on another target than its own.
    """
    if run is None or run.policy.rollout != rollout:
        return False
    built_for = ROLLOUT_TARGETS[rollout]
    if deploy_target.target != built_for:
        msg = (
            f"{env.name}: the policy's rollout: {rollout} is built for the {built_for} "
            f"target only, and {env.name} deploys to {deploy_target.target}"
        )
        raise PromotionRefused(msg)
    return True


@contextmanager
def trial_removed_on_failure(
    remove: Callable[[], None], stopped: type[PromotionError], head: str, tail: str
) -> Iterator[None]:
    """A release's trial beside what serves (canaries, greens): on a failure or an
    interruption the trial is removed first; a failure is then raised as `stopped`
    ("HEAD: the failure; TAIL"), an interruption as itself."""
    try:
        yield
    except BaseException as failure:
        remove()
        if not isinstance(failure, Exception):
            raise
        raise stopped(f"{head}: {failure}; {tail}") from failure


def changed_services(
    specs: list[ServiceSpec], plan: PromotionPlan, live: Mapping[str, DeployedService | None]
) -> list[ServiceSpec]:
    """The services whose digest changes."""
    todo = []
    for spec in specs:
        change, before = plan.change(spec.name), live[spec.name]
        if before is not None and before.image.digest == change.new_digest:
            run_logger().info("%s already runs %s", spec.name, change.image.short)
            continue
        todo.append(spec)
    return todo


def deploy_in_waves(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    plan: PromotionPlan,
    live: Mapping[str, DeployedService | None],
    deadline_s: float,
    deployed: list[str],
    wave_setting: str = "",
) -> None:
    """Deploy the services whose digest changes, a wave of `deploy_wave_size(wave_setting)`
    at a time (the user setting ELICE_DEPLOY_WAVE; empty: the machine's cores).

    A wave starts when the one before it is healthy; after a failure no further wave
    starts, and the first failure is raised (the caller restores every service).
    `deployed` collects the services that rolled out.
    """
    todo = changed_services(specs, plan, live)
    size = deploy_wave_size(wave_setting)
    for start in range(0, len(todo), size):
        wave = todo[start : start + size]
        check_deploy_lock(f"before deploying {', '.join(s.name for s in wave)}")
        futures = [
            deploy_release.submit(
                deploy_target, env, spec, plan.change(spec.name).image, deadline_s
            )
            for spec in wave
        ]
        failed = None
        for spec, future in zip(wave, futures, strict=True):
            future.wait()
            if future.state.is_completed():
                deployed.append(spec.name)
            elif failed is None:
                failed = future
        if failed is not None:
            failed.result()  # raises the wave's first failure
            msg = f"a deploy in {env.name} did not complete: {failed.state.message}"
            raise PromotionError(msg)


def verify_release(
    addresses: Mapping[str, str],
    specs: list[ServiceSpec],
    plan: PromotionPlan,
    previous: Mapping[str, Mapping[str, float] | None],
    policy: PerformancePolicy,
    analysis: AnalysisRun | None = None,
) -> dict[str, Baseline]:
    """Every service healthy on its new digest, then its baseline measured and compared
    with `previous` (service -> the previous release's recorded baseline), then the
    environment's `analysis` (if its policy has one) under load; its verdict and values
    travel in each baseline to the ledger record.

    Raises:
        HealthCheckFailed: the first unhealthy service.
        PerformanceRegression: the first service slower or failing more than allowed.
        AnalysisFailed: a check failed, or could not be judged (AnalysisInconclusive).
    """
    checks = check_service_health.map(
        [addresses[spec.name] for spec in specs],
        specs,
        unmapped(VERIFY_DEADLINE_S),
        [plan.change(spec.name).new_digest for spec in specs],
    )
    for check in checks:
        check.result()  # the first unhealthy service fails the release
    baselines = {}
    # one at a time: a baseline measured beside another service's is not its own
    for spec in specs:
        after = measure_baseline(addresses[spec.name], spec, policy)
        before = baseline_from_record(spec.name, previous.get(spec.name))
        check_regression(spec, before, after, policy)
        baselines[spec.name] = after
    if analysis is None:
        return baselines
    digests = {spec.name: plan.change(spec.name).new_digest for spec in specs}
    judged = analyse_release(analysis, addresses, digests, previous, (plan.release_id, policy))
    return with_verdicts(baselines, judged)


def with_verdicts(
    baselines: Mapping[str, Baseline], judged: Mapping[str, tuple[str, dict[str, float]]]
) -> dict[str, Baseline]:
    """The baselines with each judged service's analysis verdict line and medians (the
    ledger keeps them); a service the analysis did not judge keeps its baseline."""
    return {
        name: base.model_copy(
            update={"analysis": judged[name][0], "analysis_values": judged[name][1]}
        )
        if name in judged
        else base
        for name, base in baselines.items()
    }


def undo_release(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    live: Mapping[str, DeployedService | None],
    plan: PromotionPlan,
    record: tuple[WritableFileSystem, str],
    failure: BaseException,
) -> PromotionError:
    """All or nothing, whatever failed: every service that moved is put back, checked, and
    the ledger's intent cleared. Returns the error to raise, naming the cause:
    `PromotionRolledBack`, or a `PromotionError` when a service could not be put back.

    Neither a rollback that cannot finish (the target still failing, as it may have failed
    the deploy) nor a ledger that cannot record it (the store failing, as it may have
    failed the record) replaces the cause: the intent stays on record, and the next
    promotion or rollback of the environment finds it and puts back what served before
    (`recover_interrupted`). `record` is the ledger's store and the run whose intent it holds.
    """
    ledger, run_id = record
    try:
        restore_environment(deploy_target, env, specs, live)
        restored = confirm_restored(deploy_target, env, specs, live)
    except Exception as exc:  # noqa: BLE001 - reported with the failure it follows
        note = (
            f"{exc}; the ledger keeps release {plan.release_id} under way: the next "
            f"promotion or rollback of {env.name} puts back what served before it"
        )
        run_logger().error("%s: %s", env.name, note)
        return PromotionError(f"{failure}; {note}")
    message = rollback_message(failure, restored)
    try:
        end_deploys(ledger, env.name, run_id, f"release {plan.release_id} rolled back: {failure}")
    except Exception as exc:  # noqa: BLE001 - reported with the failure it follows
        note = (
            f"; the ledger could not record the rollback ({exc}): its intent stays, and the "
            f"next promotion or rollback of {env.name} checks it"
        )
        run_logger().error("%s%s", env.name, note)
        message += note
    return PromotionRolledBack(message, failed=str(failure), restored=restored, plan=plan)


def return_to_previous(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    state: EnvironmentState,
    record: tuple[WritableFileSystem, str],
    requested_by: str,
) -> dict[str, str | None]:
    """A rollback, all or nothing: the intent written first, each service's previous
    release restored, then one ledger revision. Returns service -> digest serving now.

    A failure part-way puts back what served before the rollback and clears the intent; a
    run that dies part-way leaves the intent, which the next promotion or rollback of the
    environment finds and puts back (`recover_interrupted`).

    Raises:
        PromotionRefused: a service has no previous release (nothing changed).
        PromotionRolledBack: a restore failed; what served before serves again.
    """
    ledger, run_id = record
    deployer = deploy_target.deployer()
    serving: dict[str, DeployedService | None] = {}
    for spec in specs:
        current = state.services.get(spec.name)
        serving[spec.name] = (
            DeployedService(
                service=spec.name,
                environment=env.name,
                image=current.image,
                address=deployer.address(env, spec),
            )
            if current is not None
            else None
        )
    begin_rollback(ledger, env.name, serving, run_id)
    try:
        restored = {spec.name: restore_service(deploy_target, env, spec, state) for spec in specs}
    except Exception as exc:
        restore_environment(deploy_target, env, specs, serving)
        back = confirm_restored(deploy_target, env, specs, serving)
        message = rollback_message(PromotionError(f"the rollback failed: {exc}"), back)
        end_deploys(ledger, env.name, run_id, message)
        raise PromotionRolledBack(message, failed=str(exc), restored=back) from exc
    change = f"{', '.join(restored)} rolled back to their previous releases by {requested_by}"
    finish_rollback(ledger, env.name, list(restored), run_id, change)
    return dict(restored)

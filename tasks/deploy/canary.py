"""Canary on the kubernetes target: the release judged beside the stable one before it
replaces it.

An environment whose analysis says `rollout: canary` (`core/analysis.py`, in the approval
policy on the protected branch) takes a release in two steps:

1. canary: each changed service's new image runs as its own Deployment `<service>-canary`
   (`canary_replicas` of it, 1 by default, or each of its steps in turn: `[1, 3]` judges
   one replica, then three) beside the stable Deployment, whose replicas
   and image are never written. Its pods carry every label the Service selects, so the
   one Service sends them their share of the traffic, plus `track: canary`, which the
   cluster's Prometheus relabels into `environment: <env>-canary`. Once the canary is
   Ready on its digest, the analysis (its `$environment` rendered as `<env>-canary`, the
   mechanism blue-green's green uses) judges it while the load probe drives the Service.
2. stable: only when the canary passed, the stable Deployment takes the image in place
   (the ordinary deploy, with its rollback), then the canary Deployment is deleted.

Any failure or exception in step 1 deletes the canary Deployments and leaves stable as it
was: the error raised (`CanaryStopped`) says so, and the promotion records it. A run
killed in between leaves a canary; the next promotion or rollback of the environment
removes it (`remove_stale_canaries`, under the deploy lock).

Services without a stable release (a first release) have nothing to protect and no
Service traffic to share: they take no canary and deploy at step 2, judged by the health
checks after it.

    canary_replicas_of(run, deploy_target, env)   the canary's replicas per step, or None
    promote_canary(...)                           both steps; the canary's verdicts
    remove_stale_canaries(deploy_target, env, catalog)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from blocks.catalog import ServiceSpec
from blocks.config import PerformancePolicy
from blocks.environments import EnvironmentSpec
from core.analysis import CANARY_SUFFIX
from core.errors import PromotionError, PromotionRefused
from core.records import DeployedService, PromotionPlan
from tasks.analysis import AnalysisRun, analyse_release
from tasks.deploy.bluegreen import wait_scraped
from tasks.deploy.kubernetes import KubernetesDeployer
from tasks.deploy.target import DeployTarget
from tasks.deploy.waves import changed_services, takes_rollout, trial_removed_on_failure
from tasks.process import run_logger

Verdicts = dict[str, tuple[str, dict[str, float]]]
"""service -> (the analysis verdict line for its ledger record, each check's median)."""


class CanaryStopped(PromotionError):
    """A canary release failed at its canary step: canary removed, stable never written."""


def canary_replicas_of(
    run: AnalysisRun | None, deploy_target: DeployTarget, env: EnvironmentSpec
) -> tuple[int, ...] | None:
    """The canary's replicas at each step of `env`'s canary rollout (None: not a canary
    rollout), checked before anything changes.

    Raises:
        PromotionRefused: a canary on another target than kubernetes.
    """
    if run is None or not takes_rollout(run, deploy_target, env, "canary"):
        return None
    return run.policy.canary_steps


def _kubernetes(deploy_target: DeployTarget) -> KubernetesDeployer:
    deployer = deploy_target.deployer()
    if not isinstance(deployer, KubernetesDeployer):
        msg = f"a canary needs the kubernetes target, not {deployer.name}"
        raise PromotionRefused(msg)
    return deployer


def remove_canaries(
    deployer: KubernetesDeployer, env: EnvironmentSpec, specs: list[ServiceSpec]
) -> None:
    """Every canary of `specs` removed; a failure to remove one is logged (never raised
    over the outcome it follows) and the others still go."""
    for spec in specs:
        try:
            deployer.remove_canary(env, spec)
        except Exception as exc:  # noqa: BLE001 - reported, the others still removed
            run_logger().error("%s: canary of %s not removed: %s", env.name, spec.name, exc)


def remove_stale_canaries(
    deploy_target: DeployTarget, env: EnvironmentSpec, catalog: Mapping[str, ServiceSpec]
) -> list[str]:
    """The canaries a killed run left in `env` removed (call it holding `deploy-<env>`:
    no live run has one then); returns their services. Nothing on other targets."""
    if deploy_target.target != "kubernetes":
        return []
    deployer = _kubernetes(deploy_target)
    stale = [name for name in deployer.canaries(env) if name in catalog]
    for name in stale:
        run_logger().warning("%s: removing the canary of %s a dead run left", env.name, name)
        deployer.remove_canary(env, catalog[name])
    return stale


def judge_canary(
    judge: AnalysisRun,
    addresses: Mapping[str, str],
    plan: PromotionPlan,
    previous: Mapping[str, Mapping[str, float] | None],
    performance: PerformancePolicy,
) -> Callable[[list[ServiceSpec]], Verdicts]:
    """The promotion's judge of its canaries: the analysis of `<env>-canary` (the canary
    pods alone) while the load probe drives each Service, once Prometheus scrapes them."""

    def run(todo: list[ServiceSpec]) -> Verdicts:
        canary = replace(judge, label=judge.environment + CANARY_SUFFIX)
        names = [spec.name for spec in todo]
        wait_scraped(canary, names)
        digests = {name: plan.change(name).new_digest for name in names}
        return analyse_release(canary, addresses, digests, previous, (plan.release_id, performance))

    return run


def promote_canary(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    plan: PromotionPlan,
    live: Mapping[str, DeployedService | None],
    replicas: tuple[int, ...],
    steps: tuple[Callable[[list[ServiceSpec]], Verdicts], Callable[[list[ServiceSpec]], None]],
) -> Verdicts:
    """The release judged as canaries, then rolled out to stable; returns the verdicts of
    the canaries' last step. `replicas` is the canary's replicas at each step, judged
    before the next; `steps` is (the judge of the canaries, the deploy of stable), each
    given the changed services.

    Raises:
        CanaryStopped: a canary failed or could not be judged; stable unchanged.
        DeployError / ToolError: stable's deploy failed (the caller puts services back).
    """
    judge, deploy_stable = steps
    deployer = _kubernetes(deploy_target)
    todo = changed_services(specs, plan, live)
    beside = [spec for spec in todo if live[spec.name] is not None]
    with trial_removed_on_failure(
        lambda: remove_canaries(deployer, env, beside),
        CanaryStopped,
        f"canary stopped in {env.name}",
        "canary removed, the stable release was never changed",
    ):
        verdicts: Verdicts = {}
        for step, count in enumerate(replicas if beside else (), 1):
            for spec in beside:
                deployer.start_canary(env, spec, plan.change(spec.name).image, count)
            verdicts = judge(beside)
            run_logger().info(
                "canary step %d of %d passed in %s: %d replica(s) each",
                step,
                len(replicas),
                env.name,
                count,
            )
    run_logger().info("canary passed in %s: rolling out %s", env.name, [s.name for s in todo])
    try:
        deploy_stable(todo)
    finally:
        remove_canaries(deployer, env, beside)
    return verdicts

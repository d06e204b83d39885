"""Promotion (dev -> staging -> production) and rollback, as Prefect flows.

The seed's Jenkinsfile.promotion: validate, verify the images, pre-deploy smoke tests,
backup, staging automatically / production after approval, deploy, verify, performance
baseline, automatic rollback. One promotion per environment at a time (global
concurrency limit `deploy-<env>`, which CI's deploys hold too); notices go out from
the flow's state hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect import Flow, flow
from prefect.client.schemas.objects import FlowRun, State
from prefect.runtime import flow_run as current_run

from blocks.approvals import ApprovalPolicy, EnvironmentPolicy
from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig
from blocks.environments import PAGED_BY_NAME, EnvironmentSpec
from blocks.repository import GitRepository, pinned_repository
from blocks.stack import green_targets_dir, stack_dir
from core.errors import (
    ConfigError,
    PipelineError,
    PromotionRefused,
    PromotionRejected,
    PromotionRolledBack,
)
from core.ledger import EnvironmentState
from core.records import (
    DeployedService,
    PromotionOutcome,
    PromotionPlan,
    SecurityVerdict,
    short_digest,
)
from core.settings import Settings
from core.windows import Freeze, clock_now
from tasks.analysis import AnalysisRun, analysis_of
from tasks.approval import (
    Promoter,
    extra_env_of,
    pause_expired,
    plan_markdown,
    read_approval_policy,
)
from tasks.audit import AuditKind
from tasks.backup import backup_environment
from tasks.context import RunContext, resolve_run
from tasks.deploy import (
    read_live_services,
    recover_interrupted,
    service_addresses,
)
from tasks.deploy.bluegreen import (
    GreenStopped,
    green_offset_of,
    promote_blue_green,
    remove_stale_greens,
)
from tasks.deploy.canary import (
    CanaryStopped,
    canary_replicas_of,
    judge_canary,
    promote_canary,
    remove_stale_canaries,
)
from tasks.deploy.target import DeployTarget, environment_target
from tasks.deploy.waves import (
    deploy_in_waves,
    return_to_previous,
    undo_release,
    verify_release,
    with_verdicts,
)
from tasks.deployment_check import refuse_local_only, require_trusted_environment
from tasks.freeze import check_deploy_window, deploy_clock, require_overridden
from tasks.gate import audit, await_approvals, check_unchanged, gate_and_promoter
from tasks.github.report import github_deployment, report_rejection, report_rollback
from tasks.health import smoke_test_release
from tasks.history import deploy_return, plan_return
from tasks.images import (
    EnvironmentRegistry,
    environment_registry,
    login_for,
    place_images,
    with_ecr_scans,
)
from tasks.locks import check_deploy_lock, deploy_lock
from tasks.metrics import publish_delivery_metrics
from tasks.notify import Notice, flow_run_url, notify, paged_environment, plan_changes
from tasks.performance import Baseline
from tasks.process import run_logger
from tasks.registry import verify_release_image
from tasks.releases import (
    begin_deploys,
    check_reviewed,
    plan_promotion,
    publish_ledger_artifact,
    read_ledger,
    record_promotion,
)
from tasks.security import check_request, security_verdict
from tasks.trusted import pipeline_config

SMOKE_DEADLINE_S = 20


# --- state hooks: notices -------------------------------------------------------------


def _paged(parameters: dict[str, Any]) -> tuple[str, ...]:
    """Environments whose failures page: production, and the gated environment of this run."""
    settings = Settings.from_environ()
    name, paged = paged_environment(
        str(parameters.get("environment")), settings, parameters.get("config_source")
    )
    if not paged:
        try:
            policy = read_approval_policy.fn(pinned_repository(settings))
            paged = policy.environments.get(name) is not None
        except PipelineError:
            paged = True  # whether it is gated is unknown: page rather than stay silent
    return (*PAGED_BY_NAME, name) if paged else PAGED_BY_NAME


def _short(digest: str | None) -> str:
    return short_digest(digest) if digest else "none"


def _send(flow_run: FlowRun, notice: Notice, *, page: bool = True) -> None:
    params = dict(flow_run.parameters or {})
    notify(notice, paged=_paged(params) if page else (), pagerduty="saved" if page else None)


def notify_promoted(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
    """on_completion: Slack "deployed"; resolves the environment's PagerDuty incident."""
    outcome = state.result(raise_on_failure=False)
    if not isinstance(outcome, PromotionOutcome) or outcome.dry_run:
        return
    plan = outcome.plan
    notice = Notice(
        kind="deployed",
        environment=plan.environment,
        release_id=plan.release_id,
        services=plan_changes(plan),
        flow_run_url=flow_run_url(str(flow_run.id)),
        message=(
            f"Promoted from {plan.source_environment} by {plan.promoted_by}"
            + (f", approved by {outcome.approved_by}" if outcome.approved_by else "")
        ),
    )
    _send(flow_run, notice)


def notify_failed(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """on_failure / on_crashed: refused, rejected, rolled back or failed; pages in production."""
    error = state.result(raise_on_failure=False)
    kind: Any = "failed"
    if isinstance(error, PromotionRefused):
        kind = "refused"
    elif isinstance(error, PromotionRejected):
        kind = "rejected"
    elif isinstance(error, PromotionRolledBack):
        kind = "rolled_back"
    message = str(error) if isinstance(error, BaseException) else (state.message or "")
    if pause_expired(state.message):
        kind = "rejected"
        message = f"nobody approved in time ({state.message}); nothing deployed"
    plan = getattr(error, "plan", None)
    notice = Notice(
        kind=kind,
        environment=str((flow_run.parameters or {}).get("environment") or "unknown"),
        release_id=plan.release_id if isinstance(plan, PromotionPlan) else "",
        services=plan_changes(plan if isinstance(plan, PromotionPlan) else None),
        flow_run_url=flow_run_url(str(flow_run.id)),
        message=message or f"{flow.name} ended {state.type.value}",
    )
    _send(flow_run, notice)


def notify_cancelled(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """on_cancellation: tell Slack the promotion was cancelled (nothing pages)."""
    notice = Notice(
        kind="failed",
        environment=str((flow_run.parameters or {}).get("environment") or "unknown"),
        flow_run_url=flow_run_url(str(flow_run.id)),
        message=f"{flow.name} was cancelled: {state.message or 'no reason given'}",
    )
    _send(flow_run, notice, page=False)


def notify_rollback_done(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """on_completion of a manual rollback: Slack only (a requested rollback is no incident)."""
    restored = state.result(raise_on_failure=False)
    services = (
        {s: f"-> {_short(d)}" for s, d in restored.items()} if isinstance(restored, dict) else {}
    )
    notice = Notice(
        kind="rolled_back",
        environment=str((flow_run.parameters or {}).get("environment") or "unknown"),
        services=services,
        flow_run_url=flow_run_url(str(flow_run.id)),
        message=f"{flow.name}: on request of {(flow_run.parameters or {}).get('requested_by')}",
    )
    _send(flow_run, notice, page=False)


# --- flows ----------------------------------------------------------------------------


def _context(
    settings: Settings,
    config_source: str | None,
    environment: str,
    target: str | None,
    drill_env: dict[str, dict[str, str]] | None = None,
) -> RunContext:
    """The run's context: configuration, `environment`, its target and registry, the
    stores; resolved once, refused before anything changes."""
    try:
        config = pipeline_config(settings, config_source)
        env = config.environment(environment)
        return resolve_run(settings, config, env, target=target, drill_env=drill_env)
    except ConfigError as exc:
        raise PromotionRefused(str(exc)) from exc


def _source(
    context: RunContext, source_env: EnvironmentSpec
) -> tuple[DeployTarget, EnvironmentRegistry]:
    """The target and registry of the environment promoted from, loaded once."""
    try:
        registry = environment_registry(source_env, context.settings.trust_roots())
        pulls = [registry.access]
        docker_host = context.settings.docker_host
        roots = context.settings.trust_roots()
        target = environment_target(
            source_env, None, None, pulls, docker_host, roots=roots, expires_at=registry.expires_at
        )
    except ConfigError as exc:
        raise PromotionRefused(str(exc)) from exc
    return target, registry


def _catalog(config: PipelineConfig) -> dict[str, ServiceSpec]:
    return {spec.name: spec for spec in config.catalog.services}


@dataclass(frozen=True)
class _Promotion:
    """What one promotion run resolved at its start, passed to its steps: the run's
    context and who promotes what, under which gate."""

    context: RunContext
    repository: GitRepository
    run_id: str
    services: list[str] | None
    promoter: Promoter
    gate: EnvironmentPolicy | None
    policy: ApprovalPolicy
    allow_unknown_scan: bool
    override_reason: str | None
    drill_env: dict[str, dict[str, str]] | None
    judge: AnalysisRun | None
    green_offset: int | None
    canary_replicas: tuple[int, ...] | None

    @property
    def config(self) -> PipelineConfig:
        return self.context.config

    @property
    def env(self) -> EnvironmentSpec:
        return self.context.env

    @property
    def deploy_target(self) -> DeployTarget:
        return self.context.deploy_target

    @property
    def registry(self) -> EnvironmentRegistry:
        assert self.context.registry is not None  # noqa: S101 - a promotion resolves it
        return self.context.registry

    def plan(self) -> PromotionPlan:
        """The plan from the ledgers, every release's commit checked against a fresh fetch.

        Each plan is checked: a dry run's, the one before the gate, and the one re-made
        under the lock after an approval (the wait may outlast a force-push).
        """
        plan = plan_promotion(
            self.context.ledger,
            self.config,
            self.env.name,
            self.services,
            self.promoter.name,
            self.repository.protected_branch,
        )
        return check_reviewed(plan, self.repository)

    def verdict(self, plan: PromotionPlan) -> SecurityVerdict:
        return security_verdict(
            plan,
            self.env,
            self.allow_unknown_scan,
            self.override_reason,
            gated=self.gate is not None,
        )


def _smoke_test_source(
    config: PipelineConfig, plan: PromotionPlan, source_target: DeployTarget
) -> None:
    """The releases answer in the environment they are promoted from (read-only), on
    that environment's own target."""
    source_env = config.environment(plan.source_environment)
    specs = config.catalog.select(plan.services)
    addresses = service_addresses(source_target, source_env, specs)
    for spec in specs:
        smoke_test_release(
            addresses[spec.name],
            source_env.name,
            spec,
            plan.change(spec.name).image,
            SMOKE_DEADLINE_S,
        )


def _prepare(run: _Promotion) -> tuple[PromotionPlan, SecurityVerdict]:
    """Plan, scan gate, verified images, smoke tests, images in this environment's registry."""
    plan = run.plan()
    verdict = run.verdict(plan)
    source_target, source = _source(run.context, run.config.environment(plan.source_environment))
    images = [c.image for c in plan.changes]
    logins = [login_for(image, source.access) for image in images]
    for future in verify_release_image.map(images, logins):
        future.result()
    _smoke_test_source(run.config, plan, source_target)
    # Into this environment's own registry, by digest, before anything deploys: the
    # ledger then names the image where this environment pulls it from.
    placed = place_images(plan, source, run.registry)
    if run.registry.ecr is not None:  # ECR's own scan joins the verdict
        placed = with_ecr_scans(placed, run.registry.ecr)
        verdict = run.verdict(placed)
    return placed, verdict


def _remove_leftovers(
    settings: Settings,
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    catalog: dict[str, ServiceSpec],
) -> None:
    """Under the lock: the canaries (kubernetes) or greens (docker) a killed run left."""
    remove_stale_canaries(deploy_target, env, catalog)
    remove_stale_greens(deploy_target, env, catalog, green_targets_dir(stack_dir(settings)))


def _approved(
    run: _Promotion, gate: EnvironmentPolicy
) -> tuple[PromotionPlan, SecurityVerdict, str]:
    """The prepared release and who approved it.

    The wait for a person holds no lock: a rollback or another release of this
    environment is never blocked by a pending approval, and a server restart during
    the wait has no lease to lose. What was approved is re-checked under the lock.
    """
    plan, verdict = _prepare(run)
    store = run.context.ledger
    audit(store, plan, run.run_id, "requested", run.promoter.name, proof=run.promoter.proof)
    extra = extra_env_of(plan, run.drill_env)
    approvers = await_approvals(plan, gate, run.policy, extra, run.run_id, store)
    return plan, verdict, ", ".join(approvers)


def _settled(
    run: _Promotion, approved: tuple[PromotionPlan, SecurityVerdict, str] | None
) -> tuple[PromotionPlan, SecurityVerdict, str | None]:
    """Under the lock: the approved release if nothing changed since, else the one prepared now."""
    if approved is None:
        plan, verdict = _prepare(run)
        return plan, verdict, None
    check_unchanged(approved[0], run.plan())
    return approved


def _canary(
    run: _Promotion,
    plan: PromotionPlan,
    seen: tuple[
        Mapping[str, DeployedService | None],
        Mapping[str, str],
        Mapping[str, Mapping[str, float] | None],
    ],
    health_deadline_s: float,
    deployed: list[str],
) -> dict[str, Baseline]:
    """The canary rollout (tasks/deploy/canary.py), then every service verified on its new
    digest like an in-place release, the canaries' verdicts joining their baselines.
    `seen` is (the live services, their addresses, their previous baselines)."""
    live, addresses, previous = seen
    env, deploy_target, perf = run.env, run.deploy_target, run.config.performance
    specs = run.config.catalog.select(plan.services)
    if run.judge is None or run.canary_replicas is None:  # _start sets both or neither
        msg = f"{env.name}: a canary rollout needs the policy's analysis"
        raise PromotionRefused(msg)
    wave = run.context.settings.deploy_wave

    def deploy_stable(todo: list[ServiceSpec]) -> None:
        deploy_in_waves(deploy_target, env, todo, plan, live, health_deadline_s, deployed, wave)

    judge = judge_canary(run.judge, addresses, plan, previous, perf)
    verdicts = promote_canary(
        deploy_target, env, specs, plan, live, run.canary_replicas, (judge, deploy_stable)
    )
    baselines = with_verdicts(verify_release(addresses, specs, plan, previous, perf), verdicts)
    detail = "canary passed" if verdicts else "no stable release to run a canary beside"
    audit(run.context.ledger, plan, run.run_id, "switched", plan.promoted_by, detail=detail)
    return baselines


def _deploy(
    run: _Promotion,
    plan: PromotionPlan,
    verdict: SecurityVerdict,
    approved_by: str | None,
    health_deadline_s: float,
) -> tuple[EnvironmentState, list[str], dict[str, Baseline]]:
    """Under the lock: back up, deploy in waves, verify, record; any failure puts every
    service back. Returns the ledger recorded, the services deployed and their baselines.
    """
    env, deploy_target = run.env, run.deploy_target
    specs = run.config.catalog.select(plan.services)
    ledger = run.context.ledger
    target_state = read_ledger(ledger, env.name)
    live = read_live_services(deploy_target, env, specs)
    backup_environment(env.name, target_state, live, fs=run.context.backups)
    begin_deploys(ledger, plan, live, run.run_id)
    addresses = service_addresses(deploy_target, env, specs)
    deployed: list[str] = []
    previous = {name: record.baseline for name, record in target_state.services.items()}
    try:
        wave = run.context.settings.deploy_wave
        if run.green_offset is not None and run.judge is not None:
            green = (run.green_offset, green_targets_dir(stack_dir(run.context.settings)))
            verify = (health_deadline_s, previous, run.config.performance, run.judge)
            baselines = promote_blue_green(
                deploy_target, env, specs, plan, live, green, verify, deployed, wave
            )
            audit(ledger, plan, run.run_id, "switched", plan.promoted_by, detail="green passed")
        elif run.canary_replicas is not None and run.judge is not None:
            baselines = _canary(run, plan, (live, addresses, previous), health_deadline_s, deployed)
        else:
            deploy_in_waves(
                deploy_target, env, specs, plan, live, health_deadline_s, deployed, wave
            )
            perf = run.config.performance
            baselines = verify_release(addresses, specs, plan, previous, perf, run.judge)
        check_deploy_lock("before the ledger recorded the release")
        state = record_promotion(ledger, plan, baselines, approved_by, verdict, run.run_id)
    except BaseException as failure:
        # All or nothing, whatever failed (the pipeline's own error, a client's, a
        # cancellation): every service that moved goes back, whichever wave it was in.
        if isinstance(failure, GreenStopped | CanaryStopped):
            kind: AuditKind = (
                "green_stopped" if isinstance(failure, GreenStopped) else "canary_stopped"
            )
            audit(ledger, plan, run.run_id, kind, plan.promoted_by, detail=str(failure))
        undone = undo_release(deploy_target, env, specs, live, plan, (ledger, run.run_id), failure)
        if not isinstance(failure, Exception):
            raise
        raise undone from failure
    return state, deployed, baselines


def _start(
    environment: str,
    config_source: str | None,
    target: str | None,
    drill_env: dict[str, dict[str, str]] | None,
    services: list[str] | None,
    who: tuple[str, str | None, str | None],
    scan: tuple[bool, str | None],
) -> _Promotion:
    """Everything a promotion resolves before it plans; refused before anything changes.

    `who` is (promoted_by, request, request_signature); `scan` (allow_unknown_scan,
    override_reason).
    """
    check_request(*scan)
    settings = Settings.from_environ()
    context = _context(settings, config_source, environment, target, drill_env)
    repository = pinned_repository(settings)
    policy = read_approval_policy(repository)
    gate, promoter = gate_and_promoter(policy, environment, who[0], who[1], who[2], services)
    judge = analysis_of(policy, context.env)  # the environment's post-deploy analysis, if any
    offsets = {e.name: e.local_port_offset for e in context.config.environments.environments}
    green_offset = green_offset_of(judge, context.deploy_target, context.env, offsets)
    canary_replicas = canary_replicas_of(judge, context.deploy_target, context.env)
    return _Promotion(
        context=context,
        repository=repository,
        run_id=str(current_run.id),
        services=services,
        promoter=promoter,
        gate=gate,
        policy=policy,
        allow_unknown_scan=scan[0],
        override_reason=scan[1],
        drill_env=drill_env,
        judge=judge,
        green_offset=green_offset,
        canary_replicas=canary_replicas,
    )


def _outcome(
    context: RunContext,
    plan: PromotionPlan,
    state: EnvironmentState,
    deployed: list[str],
    approved_by: str | None,
    baselines: dict[str, Baseline],
) -> PromotionOutcome:
    """The ledger published, the delivery metrics reported, and what the promotion did."""
    publish_ledger_artifact(context.ledger, plan.environment, state)
    # Delivery metrics are a report: failing to compute them never fails a release.
    repo = context.settings.repo
    publish_delivery_metrics(context.ledger, plan.environment, repo, return_state=True)
    return PromotionOutcome(
        plan=plan,
        deployed=deployed,
        approved_by=approved_by,
        ledger_revision=state.revision,
        baselines={
            name: b.model_dump(include={"p50_ms", "p95_ms", "error_rate"})
            for name, b in baselines.items()
        },
    )


def _window(run: _Promotion, overrides: list[dict[str, str]] | None) -> tuple[Freeze, str] | None:
    """The environment's deploy window at the run's clock: open (None), or frozen and
    overridden for a release; refused (and audited) before anything changes otherwise."""
    try:
        now = clock_now(deploy_clock(run.context.settings))
    except (ConfigError, ValueError) as exc:
        raise PromotionRefused(str(exc)) from exc
    return check_deploy_window(
        run.policy,
        run.env.name,
        now,
        overrides,
        lambda: run.plan().release_id,
        (run.context.ledger, run.run_id),
    )


@flow(
    name="promote",
    on_completion=[notify_promoted],
    on_failure=[notify_failed, report_rejection],
    on_crashed=[notify_failed],
    on_cancellation=[notify_cancelled],
)
def promote(
    environment: str,
    services: list[str] | None = None,
    promoted_by: str = "cli",
    dry_run: bool = False,
    allow_unknown_scan: bool = False,
    override_reason: str | None = None,
    config_source: str | None = None,
    target: str | None = None,
    drill_env: dict[str, dict[str, str]] | None = None,
    health_deadline_s: float = 60,
    request: str | None = None,
    request_signature: str | None = None,
    freeze_override: list[dict[str, str]] | None = None,
) -> PromotionOutcome:
    """Promote the verified releases of the environment below into `environment`.

    Args:
        environment: the target (staging, production); its `promotes_from` is the source.
        services: only these services (default: every verified one in the source).
        promoted_by: who asks (a typed name; `request` proves it).
        dry_run: plan and stop before the gate; nothing changes.
        allow_unknown_scan: let a release without a clean scan into production...
        override_reason: ...for this reason (required with the override).
        config_source: configuration file, "blocks", or None for the default (services
            and environments only: the approval policy is never the caller's).
        target: deploy target, docker or kubernetes: only to confirm the environment's
            configured one (a different value is refused).
        drill_env: rollback drills: extra container variables by image digest (docker).
        health_deadline_s: how long a new release may take to become healthy.
        request: a signed promotion request (JSON, `cicd promote --key` makes it);
            required where the environment waits for an approval.
        request_signature: its SSH signature.
        freeze_override: in a freeze of the environment's deploy windows, two approvers'
            signed overrides of this release (`cicd override-freeze` prints each).
    """
    settings = Settings.from_environ()
    require_trusted_environment(settings, environment)  # a worker's, if any
    refuse_local_only(settings, {"config_source": config_source, "drill_env": drill_env})
    who = (promoted_by, request, request_signature)
    scan = (allow_unknown_scan, override_reason)
    run = _start(environment, config_source, target, drill_env, services, who, scan)
    if dry_run:
        plan = run.plan()
        run_logger().info("dry run: nothing changes\n%s", plan_markdown(plan))
        return PromotionOutcome(plan=plan, dry_run=True)
    window = _window(run, freeze_override)
    approved = _approved(run, run.gate) if run.gate is not None else None
    with deploy_lock(environment, run.context.settings.lock_renew_s):
        catalog = _catalog(run.config)
        recover_interrupted(run.context.ledger, run.deploy_target, run.env, catalog, run.run_id)
        _remove_leftovers(run.context.settings, run.deploy_target, run.env, catalog)
        plan, verdict, approved_by = _settled(run, approved)
        require_overridden(window, plan.release_id)
        with github_deployment(plan, approved_by):  # GitHub's view; inert without its block
            state, deployed, baselines = _deploy(run, plan, verdict, approved_by, health_deadline_s)
    return _outcome(run.context, plan, state, deployed, approved_by, baselines)


def _return_to(
    context: RunContext,
    release_id: str,
    services: list[str] | None,
    requested_by: str,
    run_id: str,
) -> dict[str, str | None]:
    """Under the lock: the return to `release_id`, verified, then deployed all or nothing."""
    repository = pinned_repository(context.settings)
    planned = plan_return(context, repository, release_id, services, requested_by)
    restored = deploy_return(context, planned, run_id, requested_by)
    run_logger().info("%s returned to release %s by %s", context.env.name, release_id, requested_by)
    return restored


@flow(
    name="rollback",
    on_completion=[notify_rollback_done, report_rollback],
    on_failure=[notify_failed],
    on_crashed=[notify_failed],
    on_cancellation=[notify_cancelled],
)
def rollback(
    environment: str,
    services: list[str] | None = None,
    requested_by: str = "cli",
    config_source: str | None = None,
    target: str | None = None,
    to_release: str | None = None,
) -> dict[str, str | None]:
    """Return `environment` to its previous releases, as the ledger records them; with
    `to_release`, to that release of its ledger (`cicd history ENV` lists them), verified
    like a promotion (reviewed commits, digests in the environment's registry).

    Returns service -> digest serving now. Waits for a running promotion to finish.
    """
    settings = Settings.from_environ()
    require_trusted_environment(settings, environment)  # a worker's, if any
    refuse_local_only(settings, {"config_source": config_source})
    context = _context(settings, config_source, environment, target)
    config, env, deploy_target, ledger = (
        context.config,
        context.env,
        context.deploy_target,
        context.ledger,
    )
    if services is not None:
        try:
            config.catalog.select(services)
        except ConfigError as exc:
            raise PromotionRefused(str(exc)) from exc
    with deploy_lock(environment, settings.lock_renew_s):
        run_id = str(current_run.id)
        recovered = recover_interrupted(ledger, deploy_target, env, _catalog(config), run_id)
        _remove_leftovers(settings, deploy_target, env, _catalog(config))
        if recovered is not None:
            # A promotion died mid-deploy: what it changed is undone, and the releases the
            # ledger names serve again. Going back further is a second, deliberate request.
            run_logger().info("%s: %s", environment, recovered.change)
            publish_ledger_artifact(ledger, environment, recovered)
            return {
                name: record.image.digest
                for name, record in recovered.services.items()
                if name in (services or recovered.services)
            }
        if to_release is not None:
            restored = _return_to(context, to_release, services, requested_by, run_id)
            publish_ledger_artifact(ledger, environment)
            return restored
        state = read_ledger(ledger, environment)
        names = services or [n for n in config.catalog.names() if n in state.previous]
        if not names:
            msg = f"the ledger of {environment} keeps no previous release to return to"
            raise PromotionRefused(msg)
        specs = [config.service(name) for name in names]
        restored = return_to_previous(
            deploy_target, env, specs, state, (ledger, run_id), requested_by
        )
    run_logger().info("%s rolled back by %s: %s", environment, requested_by, restored)
    publish_ledger_artifact(ledger, environment)
    return restored

"""Promotion (dev -> staging -> production) and rollback, as Prefect flows.

The seed's Jenkinsfile.promotion: validate, verify the images, pre-deploy smoke tests,
backup, staging automatically / production after approval, deploy, verify, performance
baseline, automatic rollback. One promotion per environment at a time (global
concurrency limit `deploy-<env>`, which CI's deploys hold too); notices go out from
the flow's state hooks.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import Flow, flow, unmapped
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import FlowPauseTimeout
from prefect.runtime import flow_run as current_run

from blocks.approvals import ApprovalPolicy, EnvironmentPolicy
from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig, load_config
from blocks.environments import PAGED_BY_NAME, EnvironmentSpec
from blocks.repository import load_repository
from core.errors import (
    AnswerRefused,
    ConfigError,
    PauseInterrupted,
    PipelineError,
    PromotionError,
    PromotionRefused,
    PromotionRejected,
    PromotionRolledBack,
)
from core.records import (
    DeployedService,
    PromotionOutcome,
    PromotionPlan,
    SecurityVerdict,
    short_digest,
)
from tasks.approval import (
    Promoter,
    answer_form,
    extra_env_of,
    identify_promoter,
    judge_answer,
    pause_expired,
    plan_markdown,
    read_approval_policy,
    slack_signing_secret,
)
from tasks.audit import AuditEntry, record_decision
from tasks.backup import backup_environment
from tasks.deploy import (
    confirm_restored,
    deploy_release,
    read_live_services,
    recover_interrupted,
    restore_environment,
    restore_service,
    rollback_message,
    service_addresses,
)
from tasks.deploy.target import DeployTarget, environment_target
from tasks.health import check_service_health, smoke_test_release
from tasks.images import (
    EnvironmentRegistry,
    environment_registry,
    login_for,
    place_images,
    with_ecr_scans,
)
from tasks.locks import deploy_lock
from tasks.metrics import publish_delivery_metrics
from tasks.notify import Notice, flow_run_url, notify, paged_environment
from tasks.pause import pause_for_answer
from tasks.performance import baseline_from_record, check_regression, measure_baseline
from tasks.process import run_logger
from tasks.registry import verify_release_image
from tasks.releases import (
    begin_deploys,
    end_deploys,
    plan_promotion,
    publish_ledger_artifact,
    read_ledger,
    record_promotion,
    record_rollback,
)
from tasks.security import check_request, security_verdict

# How often a paused gate looks for an answer: half of it, on average, is the delay
# between an approval and the deploy (bench/approval_bench.py).
APPROVAL_POLL_S = 1  # seconds (Prefect takes whole seconds)
SMOKE_DEADLINE_S = 20
VERIFY_DEADLINE_S = 30


# --- state hooks: notices -------------------------------------------------------------


def _paged(parameters: dict[str, Any]) -> tuple[str, ...]:
    """Environments whose failures page: production, and the gated environment of this run."""
    name, paged = paged_environment(
        str(parameters.get("environment")), parameters.get("config_source")
    )
    if not paged:
        try:
            paged = read_approval_policy.fn(load_repository()).environments.get(name) is not None
        except PipelineError:
            paged = True  # whether it is gated is unknown: page rather than stay silent
    return (*PAGED_BY_NAME, name) if paged else PAGED_BY_NAME


def _short(digest: str | None) -> str:
    return short_digest(digest) if digest else "none"


def _services(plan: PromotionPlan | None) -> dict[str, str]:
    if plan is None:
        return {}
    return {c.service: f"{_short(c.current_digest)} -> {c.image.short}" for c in plan.changes}


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
        services=_services(plan),
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
        services=_services(plan if isinstance(plan, PromotionPlan) else None),
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


def _config(config_source: str | None, environment: str) -> PipelineConfig:
    try:
        config = load_config(config_source)
        config.environment(environment)
    except ConfigError as exc:
        raise PromotionRefused(str(exc)) from exc
    return config


def _target(
    env: EnvironmentSpec,
    target: str | None,
    drill_env: dict[str, dict[str, str]] | None = None,
) -> tuple[DeployTarget, EnvironmentRegistry]:
    """`env`'s configured target and registry, loaded; refused before anything changes."""
    try:
        registry = environment_registry(env)
        return environment_target(env, target, drill_env, [registry.access]), registry
    except ConfigError as exc:
        raise PromotionRefused(str(exc)) from exc


def _catalog(config: PipelineConfig) -> dict[str, ServiceSpec]:
    return {spec.name: spec for spec in config.catalog.services}


def _smoke_test_source(config: PipelineConfig, plan: PromotionPlan) -> None:
    """The releases answer in the environment they are promoted from (read-only), on
    that environment's own target."""
    source_env = config.environment(plan.source_environment)
    specs = config.catalog.select(plan.services)
    source_target, _ = _target(source_env, None)
    addresses = service_addresses(source_target, source_env, specs)
    for spec in specs:
        smoke_test_release(
            addresses[spec.name],
            source_env.name,
            spec,
            plan.change(spec.name).image,
            SMOKE_DEADLINE_S,
        )


def _audit(plan: PromotionPlan, run_id: str, kind: Any, who: str, **fields: str) -> None:
    record_decision(
        AuditEntry(
            environment=plan.environment,
            run_id=run_id,
            release_id=plan.release_id,
            kind=kind,
            who=who,
            **fields,
        )
    )


def _await_approvals(
    plan: PromotionPlan,
    gate: EnvironmentPolicy,
    policy: ApprovalPolicy,
    extra_env: dict[str, dict[str, str]],
    run_id: str,
) -> list[str]:
    """Pause until `gate.approvals_required` distinct approvers approved with proof.

    Every answer is judged against this run's own plan (`judge_answer`); a refused one
    (unsigned, planted, another promotion's, self-approval, a forced resume without an
    answer) is audited and the run pauses again: nothing but a valid signature moves
    it, and a valid rejection always ends it.

    Raises:
        PromotionRejected: a signed rejection, or nobody approved in time.
    """
    logger = run_logger()
    link = flow_run_url(run_id) or f"/runs/flow-run/{run_id}"
    hint = f"cicd approve {run_id} --key KEY  (or: cicd reject {run_id} --key KEY --reason ...)"
    logger.info("release %s awaits approval: %s\n  CLI: %s", plan.release_id, link, hint)
    notify(
        Notice(
            kind="approval_needed",
            environment=plan.environment,
            release_id=plan.release_id,
            services=_services(plan),
            flow_run_url=flow_run_url(run_id),
            message=f"{plan.promoted_by} asks to promote from {plan.source_environment}",
            cli_hint=hint,
            run_id=run_id,
        ),
        pagerduty=None,
    )
    slack_secret = slack_signing_secret()

    def forced(state: str) -> None:
        why = f"the waiting run was forced to {state} from outside; paused again"
        logger.warning("%s", why)
        _audit(plan, run_id, "refused", "unknown", detail=why)

    deadline = time.monotonic() + gate.timeout_s
    approved: list[str] = []
    while (remaining := int(deadline - time.monotonic())) > 0:
        try:
            answer = pause_for_answer(
                answer_form(plan, gate, approved, extra_env, run_id),
                timeout_s=remaining,
                poll_s=APPROVAL_POLL_S,
                on_forced=forced,
            )
        except FlowPauseTimeout:
            break
        except PauseInterrupted as exc:
            msg = f"{exc} while release {plan.release_id} waited for approval; nothing deployed"
            _audit(plan, run_id, "refused", "unknown", detail=msg)
            raise PromotionRejected(msg, plan=plan) from None
        except Exception as exc:  # noqa: BLE001 - a forced resume without a readable answer
            why = f"resumed without a readable answer ({type(exc).__name__}); waiting again"
            _audit(plan, run_id, "refused", "unknown", detail=why)
            time.sleep(APPROVAL_POLL_S)
            continue
        try:
            verdict = judge_answer(
                answer,
                plan=plan,
                run_id=run_id,
                extra_env=extra_env,
                gate=gate,
                policy=policy,
                promoter=plan.promoted_by,
                approved=approved,
                slack_secret=slack_secret,
            )
        except AnswerRefused as refused:
            _audit(
                plan,
                run_id,
                "refused",
                refused.claimed,
                detail=f"{refused}; waiting again",
                statement=str(getattr(answer, "statement", ""))[:20_000],
                signature=str(getattr(answer, "signature", ""))[:16_384],
            )
            continue
        evidence = {
            "proof": verdict.proof,
            "statement": verdict.statement,
            "signature": verdict.signature,
        }
        if verdict.decision == "reject":
            _audit(plan, run_id, "rejected", verdict.principal, detail=verdict.reason, **evidence)
            msg = (
                f"{verdict.principal} rejected release {plan.release_id}: {verdict.reason}; "
                "nothing deployed"
            )
            raise PromotionRejected(msg, plan=plan)
        _audit(plan, run_id, "approved", verdict.principal, **evidence)
        approved.append(verdict.principal)
        if len(approved) >= gate.approvals_required:
            logger.info("release %s approved by %s", plan.release_id, ", ".join(approved))
            return approved
    msg = (
        f"nobody approved release {plan.release_id} within {gate.timeout_s}s"
        + (f" (approved by {', '.join(approved)} only)" if approved else "")
        + "; nothing deployed"
    )
    _audit(plan, run_id, "timed_out", "nobody", detail=msg)
    logger.error(msg)
    raise PromotionRejected(msg, plan=plan)


def _gate_and_promoter(
    policy: ApprovalPolicy,
    environment: str,
    promoted_by: str,
    request: str | None,
    request_signature: str | None,
    services: list[str] | None,
) -> tuple[EnvironmentPolicy | None, Promoter]:
    """The environment's gate (from the protected policy) and the proven promoter.

    Raises:
        PromotionRefused: production without a gate in the policy, or a gated
            environment asked for without a signed request.
    """
    try:
        gate = policy.gate(environment)
    except ConfigError as exc:
        raise PromotionRefused(str(exc)) from exc
    promoter = identify_promoter(
        promoted_by, request, request_signature, policy, environment, services
    )
    if gate is not None and not promoter.verified:
        msg = (
            f"{environment} waits for an approval, so its promoter must be known by key: "
            "request it with `cicd promote --key KEY` (a typed name cannot rule out "
            "approving one's own promotion)"
        )
        raise PromotionRefused(msg)
    return gate, promoter


def deploy_wave_size() -> int:
    """How many services deploy at once: the machine's cores (ELICE_DEPLOY_WAVE overrides;
    1 deploys one after another)."""
    configured = os.environ.get("ELICE_DEPLOY_WAVE", "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            msg = f"ELICE_DEPLOY_WAVE must be a positive integer, got {configured!r}"
            raise PromotionRefused(msg)
        return int(configured)
    return max(1, os.cpu_count() or 1)


def _deploy_in_waves(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    specs: list[ServiceSpec],
    plan: PromotionPlan,
    live: dict[str, DeployedService | None],
    deadline_s: float,
    deployed: list[str],
) -> None:
    """Deploy the services whose digest changes, a wave of `deploy_wave_size()` at a time.

    A wave starts when the one before it is healthy; after a failure no further wave
    starts, and the first failure is raised (the caller restores every service).
    `deployed` collects the services that rolled out.
    """
    logger = run_logger()
    todo = []
    for spec in specs:
        change, before = plan.change(spec.name), live[spec.name]
        if before is not None and before.image.digest == change.new_digest:
            logger.info("%s already runs %s", spec.name, change.image.short)
            continue
        todo.append(spec)
    size = deploy_wave_size()
    for start in range(0, len(todo), size):
        wave = todo[start : start + size]
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


def _check_unchanged(approved: PromotionPlan, now: PromotionPlan) -> None:
    """What was approved is still what would change; else PromotionRefused, nothing deployed."""

    def moves(plan: PromotionPlan) -> list[tuple[str, str | None, str]]:
        return [(c.service, c.current_digest, c.new_digest) for c in plan.changes]

    if moves(approved) != moves(now):
        msg = (
            f"{approved.environment} changed while release {approved.release_id} waited for "
            f"approval (now: {now.release_id}); nothing deployed, promote again"
        )
        raise PromotionRefused(msg)


@flow(
    name="promote",
    on_completion=[notify_promoted],
    on_failure=[notify_failed],
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
    """
    check_request(allow_unknown_scan, override_reason)
    config = _config(config_source, environment)
    env = config.environment(environment)
    deploy_target, registry = _target(env, target, drill_env)
    repository = load_repository()
    protected = repository.protected_branch
    logger = run_logger()
    run_id = str(current_run.id)
    policy = read_approval_policy(repository)
    gate, promoter = _gate_and_promoter(
        policy, environment, promoted_by, request, request_signature, services
    )

    def prepare() -> tuple[PromotionPlan, SecurityVerdict]:
        plan = plan_promotion(config, environment, services, promoter.name, protected)
        verdict = security_verdict(
            plan, env, allow_unknown_scan, override_reason, gated=gate is not None
        )
        source = environment_registry(config.environment(plan.source_environment))
        images = [c.image for c in plan.changes]
        logins = [login_for(image, source.access) for image in images]
        for future in verify_release_image.map(images, logins):
            future.result()
        _smoke_test_source(config, plan)
        # Into this environment's own registry, by digest, before anything deploys: the
        # ledger then names the image where this environment pulls it from.
        placed = place_images(plan, source, registry)
        if registry.ecr is not None:  # ECR's own scan joins the verdict
            placed = with_ecr_scans(placed, registry.ecr)
            verdict = security_verdict(
                placed, env, allow_unknown_scan, override_reason, gated=gate is not None
            )
        return placed, verdict

    if dry_run:
        plan = plan_promotion(config, environment, services, promoter.name, protected)
        logger.info("dry run: nothing changes\n%s", plan_markdown(plan))
        return PromotionOutcome(plan=plan, dry_run=True)

    approved_by: str | None = None
    if gate is not None:
        # The wait for a person holds no lock: a rollback or another release of this
        # environment is never blocked by a pending approval, and a server restart
        # during the wait has no lease to lose. What was approved is re-checked below.
        plan, verdict = prepare()
        _audit(plan, run_id, "requested", promoter.name, proof=promoter.proof)
        extra = extra_env_of(plan, drill_env)
        approved_by = ", ".join(_await_approvals(plan, gate, policy, extra, run_id))

    with deploy_lock(environment):
        recover_interrupted(deploy_target, env, _catalog(config), run_id)
        if gate is not None:
            now = plan_promotion(config, environment, services, promoter.name, protected)
            _check_unchanged(plan, now)
        else:
            plan, verdict = prepare()
        specs = config.catalog.select(plan.services)
        target_state = read_ledger(environment)
        live = read_live_services(deploy_target, env, specs)
        backup_environment(environment, target_state, live)
        begin_deploys(plan, live, run_id)

        addresses = service_addresses(deploy_target, env, specs)
        baselines = {}
        deployed: list[str] = []
        try:
            _deploy_in_waves(deploy_target, env, specs, plan, live, health_deadline_s, deployed)
            checks = check_service_health.map(
                [addresses[spec.name] for spec in specs],
                specs,
                unmapped(VERIFY_DEADLINE_S),
                [plan.change(spec.name).new_digest for spec in specs],
            )
            for check in checks:
                check.result()  # the first unhealthy service fails the release
            # one at a time: a baseline measured beside another service's is not its own
            for spec in specs:
                after = measure_baseline(addresses[spec.name], spec, config.performance)
                previous = target_state.services.get(spec.name)
                recorded = previous.baseline if previous else None
                before_baseline = baseline_from_record(spec.name, recorded)
                check_regression(spec, before_baseline, after, config.performance)
                baselines[spec.name] = after
            state = record_promotion(plan, baselines, approved_by, verdict, run_id)
        except PipelineError as failure:
            # All or nothing: every service that moved goes back, whichever wave it was in.
            restore_environment(deploy_target, env, specs, live)
            restored = confirm_restored(deploy_target, env, specs, live)
            end_deploys(environment, run_id, f"release {plan.release_id} rolled back: {failure}")
            raise PromotionRolledBack(
                rollback_message(failure, restored),
                failed=str(failure),
                restored=restored,
                plan=plan,
            ) from failure

    publish_ledger_artifact(environment, state)
    # Delivery metrics are a report: failing to compute them never fails a release.
    publish_delivery_metrics(environment, return_state=True)
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


@flow(
    name="rollback",
    on_completion=[notify_rollback_done],
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
) -> dict[str, str | None]:
    """Return `environment` to its previous releases, as the ledger records them.

    Returns service -> digest serving now. Waits for a running promotion to finish.
    """
    config = _config(config_source, environment)
    env = config.environment(environment)
    if services is not None:
        try:
            config.catalog.select(services)
        except ConfigError as exc:
            raise PromotionRefused(str(exc)) from exc
    deploy_target, _ = _target(env, target)
    with deploy_lock(environment):
        recovered = recover_interrupted(deploy_target, env, _catalog(config), str(current_run.id))
        if recovered is not None:
            # A promotion died mid-deploy: what it changed is undone, and the releases the
            # ledger names serve again. Going back further is a second, deliberate request.
            run_logger().info("%s: %s", environment, recovered.change)
            publish_ledger_artifact(environment, recovered)
            return {
                name: record.image.digest
                for name, record in recovered.services.items()
                if name in (services or recovered.services)
            }
        state = read_ledger(environment)
        names = services or [n for n in config.catalog.names() if n in state.previous]
        if not names:
            msg = f"the ledger of {environment} keeps no previous release to return to"
            raise PromotionRefused(msg)
        restored: dict[str, str | None] = {}
        for name in names:
            restored[name] = restore_service(deploy_target, env, config.service(name), state)
            record_rollback(environment, name)
    run_logger().info("%s rolled back by %s: %s", environment, requested_by, restored)
    publish_ledger_artifact(environment)
    return restored

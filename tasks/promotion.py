"""Promotion steps: plan from the ledger, verify the images, gate on scans, deploy with rollback.

PromotionError
├── PromotionRefused     refused before anything changed (unknown, unverified, unsafe)
├── PromotionRejected    an approver said no, or nobody answered in time
└── PromotionRolledBack  deployed, failed verification, every service put back
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.transactions import Transaction, get_transaction
from pydantic import BaseModel, ConfigDict, Field

from blocks.catalog import ServiceSpec
from blocks.config import PipelineConfig
from blocks.environments import EnvironmentSpec
from tasks.approval import (
    PlannedChange,
    PromotionPlan,
    eligible_approvers,
    make_plan,
)
from tasks.deploy import Deployer, make_deployer
from tasks.exceptions import ImageError, PipelineError, PromotionError
from tasks.health import probe_health
from tasks.models import DeployedService, ImageRef
from tasks.performance import Baseline
from tasks.process import retry_on_tool_error, run_logger
from tasks.registry import image_exists, read_labels
from tasks.releases import EnvironmentState, Ledger, ReleaseRecord, with_deploy, with_verified

PAGED_BY_NAME = ("production",)


class PromotionRefused(PromotionError):
    """The promotion was refused before anything changed."""


class PromotionRejected(PromotionError):
    """An approver rejected the promotion, or nobody approved it in time; nothing deployed."""

    def __init__(self, message: str, *, plan: PromotionPlan | None = None) -> None:
        self.plan = plan
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rejected, (str(self), self.plan))


class PromotionRolledBack(PromotionError):
    """The release was deployed, failed verification, and every service was put back."""

    def __init__(
        self,
        message: str,
        *,
        failed: str,
        restored: dict[str, str | None],
        plan: PromotionPlan | None = None,
    ) -> None:
        self.failed = failed
        self.restored = restored
        self.plan = plan
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rolled_back, (str(self), self.failed, self.restored, self.plan))


def _rebuild_rejected(message: str, plan: PromotionPlan | None) -> PromotionRejected:
    return PromotionRejected(message, plan=plan)


def _rebuild_rolled_back(
    message: str, failed: str, restored: dict[str, str | None], plan: PromotionPlan | None
) -> PromotionRolledBack:
    return PromotionRolledBack(message, failed=failed, restored=restored, plan=plan)


class DeployTarget(BaseModel):
    """How to reach the deploy target; plain data, so rollback hooks can rebuild the deployer.

    `drill_env` maps an image digest to extra container variables (docker target only),
    e.g. `{digest: {"FAULT_HEALTH": "1"}}`: a rollback drill with a real image.
    """

    model_config = ConfigDict(frozen=True)

    target: Literal["docker", "kubernetes"] = "docker"
    drill_env: dict[str, dict[str, str]] = Field(default_factory=dict)

    def deployer(self) -> Deployer:
        """The configured deployer for this target, with the drill variables applied.

        Raises:
            ValueError: drill variables for a target that cannot apply them.
        """
        return make_deployer(self.target, extra_env=self.drill_env)


class SecurityVerdict(BaseModel):
    """What the scan gate decided for a promotion."""

    model_config = ConfigDict(frozen=True)

    scans: dict[str, str] = Field(description="service -> clean | vulnerable | unknown")
    overridden: list[str] = Field(default_factory=list, description="Let through by override")
    override_reason: str | None = None


class PromotionOutcome(BaseModel):
    """What a promotion did."""

    model_config = ConfigDict(frozen=True)

    plan: PromotionPlan
    dry_run: bool = False
    deployed: list[str] = Field(
        default_factory=list, description="Services deployed (not those already running it)"
    )
    approved_by: str | None = None
    ledger_revision: int | None = None
    baselines: dict[str, dict[str, float]] = Field(default_factory=dict)


# --- pure helpers ---------------------------------------------------------------------


def check_request(allow_unknown_scan: bool, override_reason: str | None) -> None:
    """Refuse inconsistent promotion options before anything happens.

    Raises:
        PromotionRefused: an override without a reason, or a reason without an override.
    """
    reason = (override_reason or "").strip()
    if allow_unknown_scan and not reason:
        msg = "--allow-unknown-scan needs --override-reason: say why an unscanned release may ship"
        raise PromotionRefused(msg)
    if reason and not allow_unknown_scan:
        msg = "--override-reason is only meaningful with --allow-unknown-scan"
        raise PromotionRefused(msg)


def lock_name(environment: str) -> str:
    """The global concurrency limit that serialises promotions into `environment`."""
    return f"promotion-{environment}"


def is_paged(env: EnvironmentSpec) -> bool:
    """Failures here page someone: production, or any environment behind an approval gate."""
    return env.name in PAGED_BY_NAME or env.approval_required


def baseline_record(baseline: Baseline) -> dict[str, float]:
    """A baseline as the ledger keeps it."""
    return {
        "p50_ms": baseline.p50_ms,
        "p95_ms": baseline.p95_ms,
        "error_rate": baseline.error_rate,
        "requests": float(baseline.requests),
    }


def baseline_from_record(service: str, record: ReleaseRecord | None) -> Baseline | None:
    """The previous release's baseline from its ledger record, None when there is none."""
    if record is None or not record.baseline or "p95_ms" not in record.baseline:
        return None
    values = record.baseline
    return Baseline(
        service=service,
        requests=int(values.get("requests", 0)),
        p50_ms=values.get("p50_ms", values["p95_ms"]),
        p95_ms=values["p95_ms"],
        error_rate=min(1.0, max(0.0, values.get("error_rate", 0.0))),
    )


def build_plan(
    config: PipelineConfig,
    target_env: str,
    services: list[str] | None,
    promoted_by: str,
    source: EnvironmentState,
    target: EnvironmentState,
) -> PromotionPlan:
    """The plan for promoting `services` from the source ledger into `target_env`.

    Raises:
        PromotionRefused: unknown environment or service, no source environment,
            unverified or missing releases, or nobody allowed to approve.
    """
    try:
        env = config.environment(target_env)
    except KeyError as exc:
        raise PromotionRefused(str(exc.args[0])) from None
    if env.promotes_from is None:
        msg = f"{env.name} is not promoted into (no promotes_from); CI deploys it directly"
        raise PromotionRefused(msg)
    if source.environment != env.promotes_from or target.environment != env.name:
        msg = (
            f"ledgers of {source.environment}/{target.environment} given for "
            f"{env.promotes_from}/{env.name}"
        )
        raise ValueError(msg)
    if not promoted_by.strip():
        msg = "promoted_by is empty: say who promotes"
        raise PromotionRefused(msg)
    if services is not None:
        if not services:
            msg = "no services given; omit --services to promote every verified service"
            raise PromotionRefused(msg)
        try:
            chosen = [s.name for s in config.catalog.select(services)]
        except ValueError as exc:
            raise PromotionRefused(str(exc)) from None
    else:
        chosen = [n for n in config.catalog.names() if n in source.services]
    if not chosen:
        msg = f"nothing to promote: no release is recorded in {env.promotes_from}"
        raise PromotionRefused(msg)
    problems = []
    for name in chosen:
        record = source.services.get(name)
        if record is None:
            problems.append(f"{name}: nothing deployed in {env.promotes_from}")
        elif not record.verified:
            problems.append(
                f"{name}: release {record.release_id} ({record.image.short}) is not verified "
                f"in {env.promotes_from}"
            )
    if problems:
        msg = f"refusing to promote into {env.name}: " + "; ".join(problems)
        raise PromotionRefused(msg)
    if env.approval_required:
        try:
            eligible_approvers(env.approvers, promoted_by)
        except ValueError as exc:
            raise PromotionRefused(str(exc)) from None
    changes = []
    for name in chosen:
        record = source.services[name]
        current = target.services.get(name)
        changes.append(
            PlannedChange(
                service=name,
                current_digest=current.image.digest if current else None,
                current_commit=current.image.commit if current else "",
                image=record.image,
                scan=record.scan,
            )
        )
    return make_plan(env.name, env.promotes_from, changes, promoted_by)


def judge_scans(
    plan: PromotionPlan, env: EnvironmentSpec, allow_unknown: bool, override_reason: str | None
) -> SecurityVerdict:
    """The scan gate: production needs "clean" scans, or an override for unknown ones.

    A vulnerable release is never let through; elsewhere scans are reported only.

    Raises:
        PromotionRefused: a vulnerable release, or (production) an unknown scan without
            an override and a reason.
    """
    check_request(allow_unknown, override_reason)
    scans = {c.service: c.scan or "unknown" for c in plan.changes}
    vulnerable = sorted(s for s, v in scans.items() if v == "vulnerable")
    if vulnerable:
        msg = f"refusing to promote into {env.name}: known vulnerabilities in {vulnerable}"
        raise PromotionRefused(msg)
    unknown = sorted(s for s, v in scans.items() if v != "clean")
    if not unknown or not is_paged(env):
        return SecurityVerdict(scans=scans)
    if not allow_unknown:
        msg = (
            f"refusing to promote into {env.name}: no clean security scan for {unknown}; "
            "rescan, or pass --allow-unknown-scan --override-reason '...'"
        )
        raise PromotionRefused(msg)
    return SecurityVerdict(scans=scans, overridden=unknown, override_reason=override_reason)


def promoted_state(
    state: EnvironmentState,
    plan: PromotionPlan,
    baselines: Mapping[str, Baseline],
    *,
    approved_by: str | None,
    verdict: SecurityVerdict,
    flow_run_id: str | None,
) -> EnvironmentState:
    """`state` with every planned service serving its new, verified release."""
    for change in plan.changes:
        fields: dict[str, Any] = {
            "service": change.service,
            "environment": plan.environment,
            "image": change.image,
            "release_id": plan.release_id,
            "flow_run_id": flow_run_id,
            "approved_by": approved_by,
            "promoted_by": plan.promoted_by,
            "scan": verdict.scans.get(change.service),
        }
        if change.service in verdict.overridden:
            fields["scan_override"] = verdict.override_reason
        state = with_deploy(state, ReleaseRecord(**fields))
        base = baselines.get(change.service)
        state = with_verified(
            state, change.service, baseline_record(base) if base else None, plan.release_id
        )
    return state


# --- tasks ----------------------------------------------------------------------------


@task(name="ensure-promotion-lock", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def ensure_promotion_lock(environment: str) -> bool:
    """Create the `promotion-<env>` global concurrency limit (1 slot) if it is missing.

    Returns True when another promotion holds it now (this run will wait), and says so.
    """
    name = lock_name(environment)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                )
            except PrefectHTTPStatusError as exc:  # created by a concurrent promotion
                if exc.response.status_code != 409:
                    raise
            run_logger().info("created global concurrency limit %s (1 slot)", name)
            return False
    busy = limit.active_slots >= limit.limit
    if busy:
        run_logger().info("another promotion into %s is running: waiting for %s", environment, name)
    return busy


@contextmanager
def promotion_lock(environment: str) -> Iterator[str]:
    """Hold `promotion-<env>` (created if missing; strict) for the duration of the block."""
    name = lock_name(environment)
    ensure_promotion_lock(environment)
    with concurrency(name, occupy=1, strict=True):
        run_logger().info("holding %s: no other promotion into %s runs now", name, environment)
        yield name


@task(name="plan-promotion", cache_policy=NO_CACHE)
def plan_promotion(
    config: PipelineConfig, target_env: str, services: list[str] | None, promoted_by: str
) -> PromotionPlan:
    """Plan from the ledgers: the verified releases of the source environment.

    Raises:
        PromotionRefused: see `build_plan`; nothing has changed.
    """
    try:
        env = config.environment(target_env)
    except KeyError as exc:
        raise PromotionRefused(str(exc.args[0])) from None
    if env.promotes_from is None:
        msg = f"{env.name} is not promoted into (no promotes_from); CI deploys it directly"
        raise PromotionRefused(msg)
    ledger = Ledger()
    plan = build_plan(
        config,
        target_env,
        services,
        promoted_by,
        ledger.current(env.promotes_from),
        ledger.current(env.name),
    )
    run_logger().info(
        "promotion %s into %s: %s",
        plan.release_id,
        plan.environment,
        ", ".join(f"{c.service} {c.image.short}" for c in plan.changes),
    )
    return plan


@task(
    name="verify-release-image",
    task_run_name="verify-release-image-{image.service}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_tool_error,
)
def verify_release_image(image: ImageRef) -> ImageRef:
    """The digest is in the registry and its revision label is the recorded commit.

    Raises:
        PromotionRefused: the image is gone, or was built from another commit.
        ToolError: the registry is unreachable (retried).
    """
    if not image_exists(image.repository, image.digest):
        msg = f"{image.service}: {image.reference} is not in the registry"
        raise PromotionRefused(msg)
    try:
        labels = read_labels(image.repository, image.digest)
    except ImageError as exc:
        msg = f"{image.service}: cannot read the labels of {image.reference}: {exc}"
        raise PromotionRefused(msg) from None
    revision = labels.get("org.opencontainers.image.revision", "")
    if image.commit and revision != image.commit:
        msg = (
            f"{image.service}: {image.short} was built from {revision or '(no revision label)'}, "
            f"but the ledger records commit {image.commit}"
        )
        raise PromotionRefused(msg)
    run_logger().info(
        "%s: %s verified in the registry (commit %s)", image.service, image.short, revision
    )
    return image


@task(name="security-verdict", cache_policy=NO_CACHE)
def security_verdict(
    plan: PromotionPlan, env: EnvironmentSpec, allow_unknown: bool, override_reason: str | None
) -> SecurityVerdict:
    """Apply the scan gate (see `judge_scans`) and log an override loudly."""
    verdict = judge_scans(plan, env, allow_unknown, override_reason)
    if verdict.overridden:
        run_logger().warning(
            "security override into %s by %s for %s: %s",
            env.name,
            plan.promoted_by,
            verdict.overridden,
            verdict.override_reason,
        )
    return verdict


@task(name="smoke-test-release", cache_policy=NO_CACHE)
def smoke_test_release(
    deploy_target: DeployTarget,
    source_env: EnvironmentSpec,
    service: ServiceSpec,
    image: ImageRef,
    deadline_s: float = 20,
) -> None:
    """The release serves healthily in the source environment, running this very digest.

    Raises:
        PromotionRefused: it does not; nothing has changed in the target.
    """
    address = deploy_target.deployer().address(source_env, service)
    result = probe_health(address, service, deadline_s=deadline_s, expect_digest=image.digest)
    if not result.ok:
        msg = (
            f"{service.name} {image.short} is not healthy in {source_env.name} "
            f"({result.url}): {'; '.join(result.failures)}"
        )
        raise PromotionRefused(msg)
    run_logger().info("%s %s is healthy in %s", service.name, image.short, source_env.name)


@task(name="read-ledger", cache_policy=NO_CACHE)
def read_ledger(environment: str) -> EnvironmentState:
    """The latest ledger revision of `environment`."""
    return Ledger().current(environment)


@task(name="read-live-services", cache_policy=NO_CACHE)
def read_live_services(
    deploy_target: DeployTarget, env: EnvironmentSpec, services: list[ServiceSpec]
) -> dict[str, DeployedService | None]:
    """What serves each service in `env` right now."""
    deployer = deploy_target.deployer()
    return {svc.name: deployer.live(env, svc) for svc in services}


@task(name="service-addresses", cache_policy=NO_CACHE)
def service_addresses(
    deploy_target: DeployTarget, env: EnvironmentSpec, services: list[ServiceSpec]
) -> dict[str, str]:
    """Where each service answers in `env`."""
    deployer = deploy_target.deployer()
    return {svc.name: deployer.address(env, svc) for svc in services}


@task(
    name="deploy-release",
    task_run_name="deploy-{service.name}-{env.name}",
    cache_policy=NO_CACHE,
)
def deploy_release(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    service: ServiceSpec,
    image: ImageRef,
    previous: DeployedService | None,
    deadline_s: float = 60,
) -> DeployedService:
    """Deploy `image`; a rollback of the enclosing transaction puts `previous` back.

    Raises:
        DeployError: it did not become healthy (the target already restored `previous`).
    """
    txn = get_transaction()
    if txn is not None:
        txn.set("deploy_target", deploy_target)
        txn.set("env", env)
        txn.set("service", service)
        txn.set("previous", previous)
    return deploy_target.deployer().deploy(env, service, image, deadline_s=deadline_s)


@deploy_release.on_rollback
def restore_previous_release(txn: Transaction) -> None:
    """Rollback hook: put back what served before this deploy (nothing: remove it)."""
    deploy_target: DeployTarget = txn.get("deploy_target")
    env: EnvironmentSpec = txn.get("env")
    service: ServiceSpec = txn.get("service")
    previous: DeployedService | None = txn.get("previous")
    logger = run_logger()
    what = previous.image.short if previous else "nothing"
    logger.warning("rolling back %s in %s to %s", service.name, env.name, what)
    deploy_target.deployer().restore(env, service, previous)


@task(name="confirm-restored", cache_policy=NO_CACHE)
def confirm_restored(
    deploy_target: DeployTarget,
    env: EnvironmentSpec,
    services: list[ServiceSpec],
    previous: Mapping[str, DeployedService | None],
    deadline_s: float = 30,
) -> dict[str, str | None]:
    """After a rollback: each service serves its previous digest again (or is gone).

    Returns service -> digest now serving (None: not deployed).

    Raises:
        PromotionError: a service does not serve what it served before the promotion.
    """
    deployer = deploy_target.deployer()
    problems = []
    serving: dict[str, str | None] = {}
    for svc in services:
        before = previous.get(svc.name)
        if before is None:
            live = deployer.live(env, svc)
            serving[svc.name] = live.image.digest if live else None
            if live is not None:
                problems.append(f"{svc.name}: {live.image.short} still runs, expected nothing")
            continue
        result = probe_health(
            deployer.address(env, svc),
            svc,
            deadline_s=deadline_s,
            expect_digest=before.image.digest,
        )
        serving[svc.name] = before.image.digest if result.ok else None
        if not result.ok:
            problems.append(f"{svc.name}: {'; '.join(result.failures)}")
    if problems:
        msg = f"rollback in {env.name} incomplete: " + "; ".join(problems)
        raise PromotionError(msg)
    run_logger().info("previous releases serve again in %s: %s", env.name, serving)
    return serving


@task(name="record-promotion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def record_promotion(
    plan: PromotionPlan,
    baselines: dict[str, Baseline],
    approved_by: str | None,
    verdict: SecurityVerdict,
    flow_run_id: str | None,
) -> EnvironmentState:
    """Write the promotion to the target's ledger in one revision: deployed and verified."""
    state = Ledger().update(
        plan.environment,
        lambda current: promoted_state(
            current,
            plan,
            baselines,
            approved_by=approved_by,
            verdict=verdict,
            flow_run_id=flow_run_id,
        ),
    )
    run_logger().info(
        "ledger %s: revision %d records release %s",
        plan.environment,
        state.revision,
        plan.release_id,
    )
    return state


@task(name="rollback-service", cache_policy=NO_CACHE)
def rollback_service(
    deploy_target: DeployTarget, env: EnvironmentSpec, service: ServiceSpec, state: EnvironmentState
) -> str | None:
    """Return `service` to its previous release from the ledger and record it.

    Returns the digest now serving (None: the service was removed).

    Raises:
        PromotionRefused: the ledger has no previous release of `service` in `env`.
    """
    previous = state.previous.get(service.name)
    current = state.services.get(service.name)
    if previous is None:
        msg = f"{service.name}: the ledger of {env.name} keeps no previous release to return to"
        raise PromotionRefused(msg)
    deployer = deploy_target.deployer()
    deployer.restore(
        env,
        service,
        DeployedService(
            service=service.name,
            environment=env.name,
            image=previous.image,
            address=deployer.address(env, service),
        ),
    )
    Ledger().restore_previous(env.name, service.name)
    run_logger().info(
        "%s in %s: %s -> %s (release %s)",
        service.name,
        env.name,
        current.image.short if current else "none",
        previous.image.short,
        previous.release_id,
    )
    return previous.image.digest


def rollback_message(failure: PipelineError, restored: Mapping[str, str | None]) -> str:
    """What a rolled-back promotion says: what failed, and what serves again."""
    back = ", ".join(
        f"{svc} {digest.removeprefix('sha256:')[:12] if digest else '(removed)'}"
        for svc, digest in sorted(restored.items())
    )
    return f"rolled back: {failure}; serving again: {back}"


def read_decision(plan: PromotionPlan, approvers: tuple[str, ...], answer: Any) -> str:
    """The approver of an approved plan; the server has validated the form already.

    Checked again here because the form is only as strict as its JSON schema.

    Raises:
        PromotionRejected: rejected (with the approver's reason).
        PromotionRefused: an answer that should never have passed the form.
    """
    approver = str(getattr(answer, "approver", ""))
    decision = str(getattr(answer, "decision", ""))
    reason = str(getattr(answer, "reason", "") or "").strip()
    if approver not in eligible_approvers(approvers, plan.promoted_by):
        msg = f"{approver!r} may not approve a promotion by {plan.promoted_by!r}; nothing deployed"
        raise PromotionRefused(msg)
    if getattr(answer, "release_id", None) != plan.release_id:
        msg = f"the answer is for another release than {plan.release_id}; nothing deployed"
        raise PromotionRefused(msg)
    if decision == "reject":
        if not reason:
            msg = (
                f"{approver} rejected release {plan.release_id} without a reason; nothing deployed"
            )
            raise PromotionRejected(msg, plan=plan)
        msg = f"{approver} rejected release {plan.release_id}: {reason}; nothing deployed"
        raise PromotionRejected(msg, plan=plan)
    if decision != "approve":
        msg = f"unknown decision {decision!r}; nothing deployed"
        raise PromotionRefused(msg)
    run_logger().info("release %s approved by %s", plan.release_id, approver)
    return approver

"""The approval gate's wait: a promotion paused until enough approvers answered with proof.

    gate_and_promoter(policy, environment, ...)   the environment's gate and the proven promoter
    await_approvals(plan, gate, policy, ...)      pause, judge each answer, audit every decision
    check_unchanged(approved, now)                what was approved is still what would change

Judging one answer is `tasks.approval.judge_answer`; the pause itself `tasks.pause`.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.exceptions import FlowPauseTimeout
from prefect.filesystems import WritableFileSystem
from prefect.input import RunInput
from pydantic import SecretStr

from blocks.approvals import ApprovalPolicy, EnvironmentPolicy
from core.errors import (
    AnswerRefused,
    ConfigError,
    PauseInterrupted,
    PromotionRefused,
    PromotionRejected,
)
from core.records import PromotionPlan
from tasks.approval import (
    Promoter,
    Verdict,
    answer_form,
    identify_promoter,
    judge_answer,
    slack_signing_secret,
)
from tasks.audit import AuditEntry, record_decision
from tasks.notify import Notice, flow_run_url, notify, plan_changes
from tasks.pause import api_unavailable, pause_for_answer
from tasks.process import run_logger

# How often a paused gate looks for an answer: half of it, on average, is the delay
# between an approval and the deploy (bench/approval_bench.py).
APPROVAL_POLL_S = 1  # seconds (Prefect takes whole seconds)


def audit(
    store: WritableFileSystem,
    plan: PromotionPlan,
    run_id: str,
    kind: Any,
    who: str,
    **fields: str,
) -> None:
    """Record one decision about `plan` in its environment's audit trail (in `store`)."""
    record_decision(
        store,
        AuditEntry(
            environment=plan.environment,
            run_id=run_id,
            release_id=plan.release_id,
            kind=kind,
            who=who,
            **fields,
        ),
    )


def gate_and_promoter(
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


def check_unchanged(approved: PromotionPlan, now: PromotionPlan) -> None:
    """What was approved is still what would change; else PromotionRefused, nothing deployed."""

    def moves(plan: PromotionPlan) -> list[tuple[str, str | None, str]]:
        return [(c.service, c.current_digest, c.new_digest) for c in plan.changes]

    if moves(approved) != moves(now):
        msg = (
            f"{approved.environment} changed while release {approved.release_id} waited for "
            f"approval (now: {now.release_id}); nothing deployed, promote again"
        )
        raise PromotionRefused(msg)


def _announce(plan: PromotionPlan, run_id: str) -> None:
    """Log and send where and how the release is approved."""
    link = flow_run_url(run_id) or f"/runs/flow-run/{run_id}"
    hint = f"cicd approve {run_id} --key KEY  (or: cicd reject {run_id} --key KEY --reason ...)"
    run_logger().info("release %s awaits approval: %s\n  CLI: %s", plan.release_id, link, hint)
    notify(
        Notice(
            kind="approval_needed",
            environment=plan.environment,
            release_id=plan.release_id,
            services=plan_changes(plan),
            flow_run_url=flow_run_url(run_id),
            message=f"{plan.promoted_by} asks to promote from {plan.source_environment}",
            cli_hint=hint,
            run_id=run_id,
        ),
        pagerduty=None,
    )


def _next_answer(
    store: WritableFileSystem,
    plan: PromotionPlan,
    form: type[RunInput],
    run_id: str,
    remaining_s: int,
) -> RunInput | None:
    """The next answer, or None when the run was resumed without a readable one.

    Raises:
        FlowPauseTimeout: nobody answered within `remaining_s`.
        PromotionRejected: the waiting run was cancelled or ended from outside.
    """

    def forced(state: str) -> None:
        why = f"the waiting run was forced to {state} from outside; paused again"
        run_logger().warning("%s", why)
        audit(store, plan, run_id, "refused", "unknown", detail=why)

    try:
        return pause_for_answer(
            form, timeout_s=remaining_s, poll_s=APPROVAL_POLL_S, on_forced=forced
        )
    except FlowPauseTimeout:
        raise
    except PauseInterrupted as exc:
        msg = f"{exc} while release {plan.release_id} waited for approval; nothing deployed"
        audit(store, plan, run_id, "refused", "unknown", detail=msg)
        raise PromotionRejected(msg, plan=plan) from None
    except Exception as exc:  # a forced resume without a readable answer, or no API
        if api_unavailable(exc):  # through the whole wait: nobody could answer
            run_logger().error("the Prefect API was unavailable until the gate's timeout: %s", exc)
            raise FlowPauseTimeout(str(exc)) from exc
        why = f"resumed without a readable answer ({type(exc).__name__}); waiting again"
        audit(store, plan, run_id, "refused", "unknown", detail=why)
        time.sleep(APPROVAL_POLL_S)
        return None


def _judged(
    store: WritableFileSystem,
    answer: RunInput,
    plan: PromotionPlan,
    gate: EnvironmentPolicy,
    policy: ApprovalPolicy,
    extra_env: dict[str, dict[str, str]],
    run_id: str,
    approved: list[str],
    slack_secret: SecretStr | None,
) -> Verdict | None:
    """The verdict on `answer`, or None (audited) when the gate refuses it."""
    try:
        return judge_answer(
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
        audit(
            store,
            plan,
            run_id,
            "refused",
            refused.claimed,
            detail=f"{refused}; waiting again",
            statement=str(getattr(answer, "statement", ""))[:20_000],
            signature=str(getattr(answer, "signature", ""))[:16_384],
        )
        return None


def _record_verdict(
    store: WritableFileSystem, plan: PromotionPlan, run_id: str, verdict: Verdict
) -> None:
    """Audit a valid answer; a rejection ends the promotion (PromotionRejected)."""
    evidence = {
        "proof": verdict.proof,
        "statement": verdict.statement,
        "signature": verdict.signature,
    }
    if verdict.decision == "reject":
        audit(store, plan, run_id, "rejected", verdict.principal, detail=verdict.reason, **evidence)
        msg = (
            f"{verdict.principal} rejected release {plan.release_id}: {verdict.reason}; "
            "nothing deployed"
        )
        raise PromotionRejected(msg, plan=plan)
    audit(store, plan, run_id, "approved", verdict.principal, **evidence)


def await_approvals(
    plan: PromotionPlan,
    gate: EnvironmentPolicy,
    policy: ApprovalPolicy,
    extra_env: dict[str, dict[str, str]],
    run_id: str,
    store: WritableFileSystem,
) -> list[str]:
    """Pause until `gate.approvals_required` distinct approvers approved with proof.

    Every answer is judged against this run's own plan (`judge_answer`); a refused one
    (unsigned, planted, another promotion's, self-approval, a forced resume without an
    answer) is audited and the run pauses again: nothing but a valid signature moves
    it, and a valid rejection always ends it.

    Raises:
        PromotionRejected: a signed rejection, or nobody approved in time.
    """
    _announce(plan, run_id)
    slack_secret = slack_signing_secret()
    deadline = time.monotonic() + gate.timeout_s
    approved: list[str] = []
    while (remaining := int(deadline - time.monotonic())) > 0:
        form = answer_form(plan, gate, approved, extra_env, run_id)
        try:
            answer = _next_answer(store, plan, form, run_id, remaining)
        except FlowPauseTimeout:
            break
        if answer is None:
            continue
        verdict = _judged(
            store, answer, plan, gate, policy, extra_env, run_id, approved, slack_secret
        )
        if verdict is None:
            continue
        _record_verdict(store, plan, run_id, verdict)
        approved.append(verdict.principal)
        if len(approved) >= gate.approvals_required:
            run_logger().info("release %s approved by %s", plan.release_id, ", ".join(approved))
            return approved
    msg = (
        f"nobody approved release {plan.release_id} within {gate.timeout_s}s"
        + (f" (approved by {', '.join(approved)} only)" if approved else "")
        + "; nothing deployed"
    )
    audit(store, plan, run_id, "timed_out", "nobody", detail=msg)
    run_logger().error(msg)
    raise PromotionRejected(msg, plan=plan)

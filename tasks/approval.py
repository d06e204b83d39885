"""The production gate: what a promotion changes, and the approval form the server enforces.

Prefect OSS has no approver RBAC, so the form itself carries the rules: the model is
built per promotion with the allowlisted approvers minus the promoter as an enum and
the plan's release id as a pattern, and a JSON-schema condition makes `reason` required
when rejecting. The server validates a resume against that schema (from the UI, the
CLI or the API alike) and refuses anything else; the run stays paused. Nothing an
approver must type gets initial data: initial data would make the field optional.

Answering goes through the same module: `read_gate` reads what a paused run waits for,
`submit_answer` resumes it and reads the server's verdict, `read_decision` is the flow's
own second check of the answer it was given.
"""

from __future__ import annotations

import time
from typing import Any, Literal
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.input import RunInput
from prefect.input.actions import read_flow_run_input
from pydantic import BaseModel, ConfigDict, Field, create_model

from tasks.exceptions import ApprovalRefused, GateError, PromotionRefused, PromotionRejected
from tasks.models import PromotionPlan
from tasks.process import run_logger

Decision = Literal["approve", "reject"]
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
# What the Prefect server says when it fails a run whose pause expired.
PAUSE_EXPIRED = "never resumed"

# Reject needs a reason: required, and with at least one non-blank character.
_REASON_WHEN_REJECTING: dict[str, Any] = {
    "if": {"properties": {"decision": {"const": "reject"}}, "required": ["decision"]},
    "then": {"required": ["reason"], "properties": {"reason": {"pattern": r"\S"}}},
}


def _code(value: str) -> str:
    return f"`{value}`"


def plan_markdown(plan: PromotionPlan) -> str:
    """The plan as markdown for the approver: a table with inline-code digests."""
    lines = [
        f"## Promote release `{plan.release_id}` to **{plan.environment}**",
        "",
        (
            f"From **{plan.source_environment}**, where every release below is verified. "
            f"Requested by **{plan.promoted_by}**."
        ),
        "",
        "| service | now | new | commits | change |",
        "|---|---|---|---|---|",
    ]
    for c in plan.changes:
        now = _code(c.current_digest) if c.current_digest else "(not deployed)"
        what = "unchanged" if c.unchanged else ("new service" if not c.current_digest else "update")
        lines.append(
            f"| {c.service} | {now} | {_code(c.new_digest)} | {_code(c.commits)} | {what} |"
        )
    lines += [
        "",
        (
            f"To approve, type the release id `{plan.release_id}`; the approver must not be "
            f"{plan.promoted_by}. A rejection needs a reason."
        ),
    ]
    return "\n".join(lines)


class _ApprovalBase(RunInput):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_REASON_WHEN_REJECTING)


def eligible_approvers(approvers: list[str] | tuple[str, ...], promoted_by: str) -> list[str]:
    """The allowlisted approvers who may approve a promotion by `promoted_by`.

    Raises:
        PromotionRefused: nobody is left (empty allowlist, or the promoter is the only one).
    """
    eligible = [a for a in dict.fromkeys(approvers) if a != promoted_by]
    if not eligible:
        msg = (
            f"nobody may approve a promotion by {promoted_by!r}: approvers are "
            f"{list(approvers)} and nobody approves their own promotion"
        )
        raise PromotionRefused(msg)
    return eligible


def approval_model(plan: PromotionPlan, approvers: list[str] | tuple[str, ...]) -> type[RunInput]:
    """The approval form of `plan`, with the plan's markdown as its description.

    Fields: `approver` (one of `approvers` except the promoter), `release_id` (must be
    the plan's), `decision` (approve or reject), `reason` (required when rejecting).

    Raises:
        PromotionRefused: nobody may approve (see `eligible_approvers`).
    """
    eligible = eligible_approvers(approvers, plan.promoted_by)
    approver_type: Any = Literal[tuple(eligible)]  # an enum of exactly these names
    model = create_model(
        "PromotionApproval",
        __base__=_ApprovalBase,
        __module__=__name__,
        approver=(
            approver_type,
            Field(description="Who approves; the promoter may not approve their own release"),
        ),
        release_id=(
            str,
            Field(
                pattern=f"^{plan.release_id}$",
                description="Type the release id shown above: binds the approval to its digests",
            ),
        ),
        decision=(Decision, Field(description="approve deploys the release; reject stops it")),
        reason=(str, Field(default="", description="Why; required when rejecting")),
    )
    return model.with_initial_data(description=plan_markdown(plan))


def approval_input(
    approver: str, release: str, decision: Decision = "approve", reason: str = ""
) -> dict[str, str]:
    """The run input a resume sends (what the UI form posts)."""
    data = {"approver": approver, "release_id": release, "decision": decision}
    if reason:
        data["reason"] = reason
    return data


def release_id_from_schema(schema: dict[str, Any]) -> str | None:
    """The release id a paused promotion's approval schema demands, if it is one."""
    prop = schema.get("properties", {}).get("release_id", {})
    pattern = prop.get("pattern") if isinstance(prop, dict) else None
    if isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$"):
        return pattern[1:-1]
    return None


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


# --- answering a paused promotion through the Prefect API ---------------------------


class Gate(BaseModel):
    """A paused promotion waiting for its approval form."""

    model_config = ConfigDict(frozen=True)

    run_id: UUID
    run_name: str
    environment: str
    release_id: str | None
    description: str
    schema_: dict[str, Any]


def read_gate(run_id: UUID) -> Gate:
    """The approval form a paused promotion waits on.

    Raises:
        GateError: no such run, not paused, or paused without an approval form (yet).
    """
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound as exc:
            msg = f"no flow run {run_id}"
            raise GateError(msg) from exc
    state = run.state
    if state is None or not state.is_paused():
        what = state.type.value if state else "without a state"
        msg = f"run {run_id} ({run.name}) is {what}, not waiting for an approval"
        raise GateError(msg)
    keyset = state.state_details.run_input_keyset
    if not keyset:
        msg = f"run {run_id} is paused without an approval form"
        raise GateError(msg)
    schema = read_flow_run_input(keyset["schema"], flow_run_id=run_id)
    if not isinstance(schema, dict):
        msg = f"run {run_id} is still pausing (no approval form yet); try again in a few seconds"
        raise GateError(msg)
    description = read_flow_run_input(keyset["description"], flow_run_id=run_id)
    return Gate(
        run_id=run_id,
        run_name=run.name,
        environment=str((run.parameters or {}).get("environment", "")),
        release_id=release_id_from_schema(schema),
        description=str(description or ""),
        schema_=schema,
    )


def submit_answer(run_id: UUID, run_input: dict[str, str]) -> None:
    """Resume the paused run with `run_input` and read the server's answer.

    Raises:
        ApprovalRefused: the server refused the input (the run stays paused).
        GateError: the run is no longer paused.
    """
    with get_client(sync_client=True) as client:
        answer = client.resume_flow_run(run_id, run_input=run_input)
    if answer.status == SetStateStatus.ACCEPT:
        return
    reason = getattr(answer.details, "reason", None) or "no reason given"
    if answer.status == SetStateStatus.REJECT and not (answer.state and answer.state.is_failed()):
        raise ApprovalRefused(reason)
    msg = f"run {run_id} cannot be resumed: {reason}"
    raise GateError(msg)


def wait_for_final(run_id: UUID, timeout_s: float = 600, poll_s: float = 1) -> Any:
    """Poll until the run reaches a final state; returns that state (None on timeout)."""
    end = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.type in FINAL:
                return state
            if time.monotonic() >= end:
                return None
            time.sleep(poll_s)


def pause_expired(message: str | None) -> bool:
    """True when a run's state message says its approval gate expired unanswered."""
    return PAUSE_EXPIRED in (message or "")

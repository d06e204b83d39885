"""The approval gate: what a promotion changes, who may say yes, and proof that they did.

Open-source Prefect has no users: anyone with API access can resume a paused run with
any input. So an answer counts only with proof of who gave it: a statement naming the
run, the environment, the release and every digest and extra container variable,
signed with an SSH key (`ssh-keygen -Y sign`, `tasks/signing.py`) that the protected
approval policy (`blocks/approvals.py`) lists for an approver. The flow builds the
statement it expects from its own plan and verifies the signature against that; the
server-stored form and description are a convenience for people, never trusted. An
answer without such proof changes nothing: the run records it in the audit trail and
waits on.

The promoter is identified the same way, by a signed promotion request; self-approval
is decided by key, never by a typed name.

Answering goes through this module too: `read_gate` reads what a paused run waits for,
`answer_for` computes the plan from the ledger itself and signs a statement of it,
`submit_answer` resumes the run and reads the server's verdict.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID

from prefect import task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.input import RunInput
from prefect.input.actions import read_flow_run_input
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from blocks.approvals import POLICY_FILE, ApprovalPolicy, EnvironmentPolicy, parse_policy
from blocks.repository import GitRepository, pinned_repository
from blocks.storage import ledger_filesystem
from core.errors import (
    AnswerRefused,
    ApprovalRefused,
    ConfigError,
    GateError,
    PromotionRefused,
    SignatureRefused,
    SigningError,
    SlackRequestRefused,
)
from core.records import PromotionPlan, utcnow
from core.settings import Settings
from tasks.process import run_logger
from tasks.releases import Ledger, build_plan, source_of
from tasks.signing import (
    ApprovalStatement,
    PromotionRequest,
    key_fingerprint,
    sign_statement,
    statement_from_json,
    verify_statement,
)
from tasks.slack_actions import (
    ReplayGuard,
    SlackDecision,
    SlackProof,
    approver_for,
    parse_slack_decision,
    verify_slack_request,
)
from tasks.trusted import pipeline_config
from tasks.workspace import read_protected_file

Decision = Literal["approve", "reject"]
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
# What the Prefect server says when it fails a run whose pause expired.
PAUSE_EXPIRED = "never resumed"
CLOCK_SKEW = timedelta(minutes=5)
REQUEST_MAX_AGE = timedelta(minutes=10)
SLACK_SECRET_BLOCK = "elice-slack-signing-secret"  # noqa: S105 - a block's name


def _code(value: str) -> str:
    return f"`{value}`"


def plan_markdown(
    plan: PromotionPlan, extra_env: Mapping[str, Mapping[str, str]] | None = None
) -> str:
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
    for service, variables in sorted((extra_env or {}).items()):
        names = ", ".join(f"{k}={v}" for k, v in sorted(variables.items()))
        lines.append(f"\nExtra container variables of **{service}**: `{names}`")
    return "\n".join(lines)


def gate_markdown(
    plan: PromotionPlan,
    gate: EnvironmentPolicy,
    approved: Sequence[str],
    extra_env: Mapping[str, Mapping[str, str]] | None,
    run_id: str,
) -> str:
    """What the paused run's form shows: the plan, and how to answer with proof."""
    have = f" (approved so far: {', '.join(approved)})" if approved else ""
    return (
        plan_markdown(plan, extra_env)
        + "\n\n"
        + f"Needs {gate.approvals_required} signed approval(s) from "
        + f"{', '.join(gate.approvers)}, never the promoter{have}. "
        + f"Answer with `cicd approve {run_id} --key KEY` (or `cicd reject ... --reason`); "
        + f"for this form, paste what `cicd sign {run_id} --key KEY` prints. "
        + "An answer without a valid signature is refused and recorded."
    )


class ApprovalAnswer(RunInput):
    """The form of a gated promotion: a signed statement, as `cicd sign` prints it (or, from
    the Slack receiver, the button press as Slack signed it)."""

    model_config = ConfigDict(extra="forbid")

    statement: str = Field(
        default="", max_length=20_000, description="The statement (JSON) `cicd sign` printed"
    )
    signature: str = Field(
        default="", max_length=16_384, description="Its SSH signature (BEGIN SSH SIGNATURE)"
    )
    slack_timestamp: str = Field(default="", max_length=20, description="Slack buttons only")
    slack_signature: str = Field(default="", max_length=100, description="Slack buttons only")
    slack_body: str = Field(default="", max_length=65_536, description="Slack buttons only")


def answer_form(
    plan: PromotionPlan,
    gate: EnvironmentPolicy,
    approved: Sequence[str],
    extra_env: Mapping[str, Mapping[str, str]] | None,
    run_id: str,
) -> type[RunInput]:
    """The form the paused run shows (its description is for people; nothing in it is
    trusted)."""
    return ApprovalAnswer.with_initial_data(
        description=gate_markdown(plan, gate, approved, extra_env, run_id)
    )


def extra_env_of(
    plan: PromotionPlan, drill_env: Mapping[str, Mapping[str, str]] | None
) -> dict[str, dict[str, str]]:
    """service -> the extra container variables deployed with its new image (drills)."""
    return {
        c.service: dict(drill_env[c.new_digest])
        for c in plan.changes
        if drill_env and c.new_digest in drill_env
    }


def statement_for(
    plan: PromotionPlan,
    run_id: str,
    extra_env: Mapping[str, Mapping[str, str]],
    decision: Decision,
    reason: str,
    signer: str,
    signed_at: datetime | None = None,
) -> ApprovalStatement:
    """The statement an approver signs about `plan` in run `run_id`."""
    return ApprovalStatement(
        run_id=run_id,
        environment=plan.environment,
        release_id=plan.release_id,
        digests={c.service: c.new_digest for c in plan.changes},
        extra_env={k: dict(v) for k, v in extra_env.items()},
        decision=decision,
        reason=reason,
        signed_at=signed_at or utcnow(),
        signer=signer,
    )


class Verdict(BaseModel):
    """An answer the gate accepted: who decided what, with which proof."""

    model_config = ConfigDict(frozen=True)

    decision: Decision
    principal: str
    proof: str
    reason: str
    statement: str
    signature: str


def judge_answer(
    answer: Any,
    *,
    plan: PromotionPlan,
    run_id: str,
    extra_env: Mapping[str, Mapping[str, str]],
    gate: EnvironmentPolicy,
    policy: ApprovalPolicy,
    promoter: str,
    approved: Sequence[str],
    slack_secret: SecretStr | None = None,
) -> Verdict:
    """The verdict of an answer, or AnswerRefused (the run waits on).

    The statement must be exactly the one this run expects (run, environment, release,
    digests, extra variables), signed by a key the policy lists for its signer, who
    must be an approver of this environment, not the promoter, and (approving) not
    one who approved already.
    """
    if getattr(answer, "slack_body", ""):
        slack = _judge_slack(answer, plan=plan, run_id=run_id, policy=policy, secret=slack_secret)
        return _admit(slack, gate, plan, promoter, approved)
    text = str(getattr(answer, "statement", "") or "")
    signature = str(getattr(answer, "signature", "") or "")
    try:
        claimed = statement_from_json(text)
    except SignatureRefused as exc:
        raise AnswerRefused(str(exc)) from None
    who = claimed.signer
    expected = statement_for(
        plan, run_id, extra_env, claimed.decision, claimed.reason, who, claimed.signed_at
    )
    wrong = [
        name
        for name in ("run_id", "environment", "release_id", "digests", "extra_env")
        if getattr(claimed, name) != getattr(expected, name)
    ]
    if wrong:
        msg = f"the statement is not about this promotion: its {', '.join(wrong)} differ"
        raise AnswerRefused(msg, who)
    if claimed.signed_at > utcnow() + CLOCK_SKEW:
        msg = f"the statement is signed in the future ({claimed.signed_at:%Y-%m-%d %H:%M:%S})"
        raise AnswerRefused(msg, who)
    try:
        principal = verify_statement(claimed, signature, policy.allowed_signers)
        proof = f"ssh-key {key_fingerprint(signature)}"
    except (SignatureRefused, SigningError, ConfigError) as exc:
        raise AnswerRefused(str(exc), who) from None
    verdict = Verdict(
        decision=claimed.decision,
        principal=principal,
        proof=proof,
        reason=claimed.reason,
        statement=text,
        signature=signature,
    )
    return _admit(verdict, gate, plan, promoter, approved)


def _admit(
    verdict: Verdict,
    gate: EnvironmentPolicy,
    plan: PromotionPlan,
    promoter: str,
    approved: Sequence[str],
) -> Verdict:
    """`verdict` when its proven principal may decide here; else AnswerRefused."""
    principal = verdict.principal
    if principal not in gate.approvers:
        msg = f"{principal} is not an approver of {plan.environment}"
        raise AnswerRefused(msg, principal)
    if principal == promoter:
        msg = f"{principal} promoted this release; nobody approves their own promotion"
        raise AnswerRefused(msg, principal)
    if verdict.decision == "approve" and principal in approved:
        msg = f"{principal} approved already; another approver must"
        raise AnswerRefused(msg, principal)
    return verdict


def _judge_slack(
    answer: Any,
    *,
    plan: PromotionPlan,
    run_id: str,
    policy: ApprovalPolicy,
    secret: SecretStr | None,
) -> Verdict:
    """A Slack button press, checked again here: Slack's signature with the signing secret
    (the gate's own copy), its age, the run and release it names, and the Slack user's
    principal in the protected policy."""
    proof = SlackProof(
        timestamp=str(getattr(answer, "slack_timestamp", "")),
        signature=str(getattr(answer, "slack_signature", "")),
        body=str(getattr(answer, "slack_body", "")),
    )
    if secret is None:
        msg = f"a Slack answer, but no Slack signing secret is saved ({SLACK_SECRET_BLOCK})"
        raise AnswerRefused(msg)
    body = proof.body.encode("utf-8")
    try:
        verify_slack_request(secret, proof.headers(), body, time.time(), ReplayGuard())
        decision = parse_slack_decision(body)
    except SlackRequestRefused as exc:
        raise AnswerRefused(f"Slack answer refused: {exc}") from None
    try:
        principal = approver_for(decision.user_id, policy.slack_users)
    except SlackRequestRefused as exc:
        raise AnswerRefused(str(exc), f"slack:{decision.user_id}") from None
    if decision.run_id != run_id or decision.release_id != plan.release_id:
        msg = "the Slack answer is about another run or release"
        raise AnswerRefused(msg, principal)
    return Verdict(
        decision=decision.action,
        principal=principal,
        proof=f"slack {decision.user_id}",
        reason=f"rejected in Slack by {principal}" if decision.action == "reject" else "",
        statement=proof.body,
        signature=proof.signature,
    )


def slack_signing_secret() -> SecretStr | None:
    """The Slack signing secret the gate checks button presses with; None when not saved."""
    try:
        block = cast("Secret[str]", Secret.load(SLACK_SECRET_BLOCK))  # sync here: no loop
    except ValueError:
        return None
    value = block.get()
    return SecretStr(str(value)) if value else None


def resume_from_slack(decision: SlackDecision, approver: str) -> str:
    """The Slack receiver's handler: hand the press, as Slack signed it, to the paused run.

    The run checks it again itself (`_judge_slack`); this only delivers it.

    Raises:
        GateError: the run is not waiting for an answer.
        ApprovalRefused: the server refused the input.
    """
    if decision.proof is None:
        msg = "a Slack decision without the request that carried it"
        raise GateError(msg)
    read_gate(UUID(decision.run_id))  # a run that is not waiting: say so, send nothing
    submit_answer(
        UUID(decision.run_id),
        {
            "slack_timestamp": decision.proof.timestamp,
            "slack_signature": decision.proof.signature,
            "slack_body": decision.proof.body,
        },
    )
    return f"{approver}: {decision.action} of release {decision.release_id} sent to the run"


class Promoter(BaseModel):
    """Who asked for a promotion, and what proves it."""

    model_config = ConfigDict(frozen=True)

    name: str
    proof: str = Field(default="", description="ssh key fingerprint; empty: only a typed name")

    @property
    def verified(self) -> bool:
        """True when a signature proves the name."""
        return bool(self.proof)


def identify_promoter(
    typed: str,
    request: str | None,
    request_signature: str | None,
    policy: ApprovalPolicy,
    environment: str,
    services: Sequence[str] | None,
) -> Promoter:
    """The promoter: the principal of a signed request, else only the typed name.

    A workflow's key (`policy.automation_signers`) signs for the person who triggered
    the workflow (`actor`), mapped to a principal by `policy.github_users`.

    Raises:
        PromotionRefused: the request is malformed, stale, for something else, or its
            signature proves nobody.
    """
    if not request:
        return Promoter(name=typed)
    try:
        asked = PromotionRequest.model_validate_json(request)
    except ValidationError as exc:
        msg = f"the promotion request is not valid: {exc.error_count()} errors"
        raise PromotionRefused(msg) from None
    if asked.environment != environment or asked.services != tuple(sorted(set(services or ()))):
        msg = "the signed promotion request names another environment or other services"
        raise PromotionRefused(msg)
    if abs(utcnow() - asked.signed_at) > REQUEST_MAX_AGE:
        msg = f"the signed promotion request is older than {REQUEST_MAX_AGE}; sign a new one"
        raise PromotionRefused(msg)
    try:
        principal = verify_statement(asked, request_signature or "", policy.allowed_signers)
        proof = f"ssh-key {key_fingerprint(request_signature or '')}"
    except (SignatureRefused, SigningError, ConfigError) as exc:
        msg = f"the promotion request's signature proves nobody: {exc}"
        raise PromotionRefused(msg) from None
    if principal in policy.automation_signers:
        if not asked.actor:
            msg = f"{principal} signs for a workflow: its request must name the actor"
            raise PromotionRefused(msg)
        name = policy.github_users.get(asked.actor, f"github:{asked.actor}")
        return Promoter(name=name, proof=f"{proof} for {asked.actor}")
    return Promoter(name=principal, proof=proof)


def sign_request(
    environment: str, services: Sequence[str] | None, signer: str, key: Path, actor: str = ""
) -> tuple[str, str]:
    """A signed promotion request: (request JSON, signature)."""
    request = PromotionRequest(
        environment=environment,
        services=tuple(services or ()),
        actor=actor,
        signed_at=utcnow(),
        signer=signer,
    )
    return request.model_dump_json(), sign_statement(request, key)


# --- answering a paused promotion through the Prefect API ---------------------------


class Gate(BaseModel):
    """A paused promotion waiting for an answer."""

    model_config = ConfigDict(frozen=True)

    run_id: UUID
    run_name: str
    environment: str
    description: str
    parameters: dict[str, Any]


def read_gate(run_id: UUID) -> Gate:
    """The paused promotion `run_id` and the form it waits on.

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
        description=str(description or ""),
        parameters=dict(run.parameters or {}),
    )


def plan_of_gate(gate: Gate, settings: Settings) -> tuple[PromotionPlan, dict[str, dict[str, str]]]:
    """The plan a paused promotion waits on, computed here from the ledgers (never read
    from the server's description), and its extra container variables.

    Raises:
        PromotionRefused: the ledgers no longer give a plan for it.
        ConfigError: the run names a configuration that cannot be loaded.
    """
    params = gate.parameters
    config = pipeline_config(settings, params.get("config_source"))
    env = config.environments.resolve(gate.environment)
    source = source_of(config, env.name)
    ledger = Ledger(ledger_filesystem(settings))
    plan = build_plan(
        config,
        env.name,
        params.get("services"),
        str(params.get("promoted_by") or ""),
        ledger.current(str(source.promotes_from)),
        ledger.current(env.name),
        protected_branch=pinned_repository(settings).protected_branch,
    )
    return plan, extra_env_of(plan, params.get("drill_env"))


def answer_for(
    run_id: UUID,
    key: Path,
    signer: str,
    decision: Decision,
    reason: str = "",
    *,
    settings: Settings | None = None,
) -> tuple[dict[str, str], PromotionPlan, ApprovalStatement]:
    """Sign a decision about the paused promotion `run_id`: (run input, plan, statement).

    The plan is computed from the ledger where the user settings keep it (`settings`, the
    command line's; read from the environment here when not given).

    Raises:
        GateError: the run is not waiting for an answer.
        SigningError: the key cannot sign.
    """
    plan, extra = plan_of_gate(read_gate(run_id), settings or Settings.from_environ())
    statement = statement_for(plan, str(run_id), extra, decision, reason, signer)
    signature = sign_statement(statement, key)
    return {"statement": statement.model_dump_json(), "signature": signature}, plan, statement


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


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def read_approval_policy(repository: GitRepository) -> ApprovalPolicy:
    """The approval policy as committed on the protected branch (none committed: empty,
    so only production's built-in gate applies, and it refuses for want of approvers).

    Raises:
        ConfigError: the committed policy is invalid.
        ToolError: the repository cannot be fetched.
    """
    try:
        text = read_protected_file(repository, POLICY_FILE)
    except ConfigError:
        run_logger().warning(
            "%s is not on %s: no environment is gated but production",
            POLICY_FILE,
            repository.protected_branch,
        )
        return ApprovalPolicy()
    return parse_policy(text, f"{POLICY_FILE} on {repository.protected_branch}")

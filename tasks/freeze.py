"""Deploy windows at a promotion's start: a frozen environment is refused before anything
changes, unless two distinct approvers signed an override naming the reason.

The freezes are the environment's `deploy_windows` in the approval policy on the protected
branch (`blocks/approvals.py`, evaluated by `core/windows.py`). An override is a
`FreezeOverride` statement (environment, release, reason, when, who) signed with the
approver's SSH key exactly like an approval (`tasks/signing.py`, same namespace, same
allowed signers): the release id is a hash of every service's digest, so an override lets
through that release only. Refusals, refused override signatures and accepted overrides
all enter the environment's audit trail (`tasks/audit.py`).

    deploy_clock(settings)                          the ELICE_CLOCK setting; refused on a worker
    sign_override(env, release, reason, who, key)   {statement, signature}, for `promote`
    check_deploy_window(...)                        None (open), the overridden Freeze, or
                                                    PromotionRefused
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blocks.approvals import ApprovalPolicy
from core.errors import ConfigError, PromotionRefused, SignatureRefused, SigningError
from core.records import utcnow
from core.settings import Settings
from core.windows import Freeze, frozen_at
from tasks.audit import AuditEntry, record_decision
from tasks.process import run_logger
from tasks.signing import (
    canonical,
    environment_name,
    key_fingerprint,
    principal,
    sign_statement,
    utc_second,
    verify_statement,
)

OVERRIDE_FORMAT = "elice-devops-freeze-override/v1"
OVERRIDE_MAX_AGE = timedelta(hours=24)
"""An override signed longer ago than this no longer counts (the release may have aged)."""
CLOCK_SKEW = timedelta(minutes=5)
OVERRIDES_REQUIRED = 2


class FreezeOverride(BaseModel):
    """What an approver signs to let one release into a frozen environment."""

    model_config = ConfigDict(frozen=True)

    environment: str
    release_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=2000)
    signed_at: datetime
    signer: str

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        return environment_name(value)

    @field_validator("signed_at")
    @classmethod
    def _signed_at(cls, value: datetime) -> datetime:
        return utc_second(value)

    @field_validator("signer")
    @classmethod
    def _signer(cls, value: str) -> str:
        return principal(value)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if not value.strip():
            msg = "an override must name its reason"
            raise ValueError(msg)
        return value.strip()

    def canonical(self) -> bytes:
        """The exact bytes signed (the layout of `ApprovalStatement.canonical`)."""
        document: dict[str, Any] = {
            "format": OVERRIDE_FORMAT,
            "environment": self.environment,
            "release_id": self.release_id,
            "reason": self.reason,
            "signed_at": self.signed_at,
            "signer": self.signer,
        }
        return canonical(document)


def deploy_clock(settings: Settings) -> str:
    """The ELICE_CLOCK setting, for a run on a person's machine (drills, tests).

    Raises:
        ConfigError: it is set on a worker (a trust file that names the configuration):
            a freeze is never judged at a time the caller chose there.
    """
    if not settings.clock:
        return ""
    roots = settings.trust_roots()
    if roots is not None and roots.config is not None:
        msg = "a fixed clock serves drills and tests only; a worker judges windows by its own"
        raise ConfigError(msg)
    return settings.clock


def sign_override(
    environment: str,
    release_id: str,
    reason: str,
    signer: str,
    key: Path,
    signed_at: datetime | None = None,
) -> dict[str, str]:
    """A signed override of `environment`'s freeze for `release_id`: {statement, signature}
    (`signed_at`: now, unless a drill's clock says otherwise).

    Raises:
        ValueError: a field is invalid (the message names it).
        SigningError: the key cannot sign.
    """
    override = FreezeOverride(
        environment=environment,
        release_id=release_id,
        reason=reason,
        signed_at=signed_at or utcnow(),
        signer=signer,
    )
    return {"statement": override.model_dump_json(), "signature": sign_statement(override, key)}


class _Judged(BaseModel):
    """One override signature, accepted (principal, proof) or refused (why)."""

    claimed: str
    accepted: bool
    proof: str = ""
    why: str = ""
    reason: str = ""
    statement: str = ""
    signature: str = ""


def _judge(
    given: Mapping[str, str],
    environment: str,
    release_id: str,
    policy: ApprovalPolicy,
    now: datetime,
) -> _Judged:
    statement, signature = str(given.get("statement", "")), str(given.get("signature", ""))
    raw = {"statement": statement, "signature": signature}
    try:
        override = FreezeOverride.model_validate_json(statement)
    except ValidationError as exc:
        return _Judged(claimed="unknown", accepted=False, why=f"not an override: {exc}", **raw)
    who = override.signer
    problems = []
    if (override.environment, override.release_id) != (environment, release_id):
        problems.append(
            f"it overrides {override.environment} for release {override.release_id}, "
            f"not {environment} for {release_id}"
        )
    if not now - OVERRIDE_MAX_AGE <= override.signed_at <= now + CLOCK_SKEW:
        problems.append(f"it was signed at {override.signed_at:%Y-%m-%d %H:%M:%S} UTC")
    if who not in policy.override_approvers(environment):
        problems.append(f"{who} may not override {environment}'s freeze")
    if problems:
        return _Judged(claimed=who, accepted=False, why="; ".join(problems), **raw)
    try:
        verify_statement(override, signature, policy.allowed_signers)
    except (SignatureRefused, SigningError, ConfigError) as exc:
        return _Judged(claimed=who, accepted=False, why=str(exc), **raw)
    proof = f"ssh-key {key_fingerprint(signature)}"
    return _Judged(claimed=who, accepted=True, proof=proof, reason=override.reason, **raw)


def _audit(
    store: WritableFileSystem, environment: str, run_id: str, release_id: str, judged: _Judged
) -> None:
    record_decision(
        store,
        AuditEntry(
            environment=environment,
            run_id=run_id,
            release_id=release_id or "-",
            kind="freeze_override" if judged.accepted else "refused",
            who=judged.claimed,
            proof=judged.proof,
            detail=judged.reason if judged.accepted else f"freeze override refused: {judged.why}",
            statement=judged.statement,
            signature=judged.signature,
        ),
    )


def _overridden(judged: Sequence[_Judged]) -> tuple[list[_Judged], str]:
    """The accepted overrides of distinct approvers naming one reason, and what is missing."""
    accepted: dict[str, _Judged] = {}
    for one in judged:
        if one.accepted:
            accepted.setdefault(one.claimed, one)
    reasons = {one.reason for one in accepted.values()}
    if len(reasons) > 1:
        return [], f"the overrides name different reasons: {sorted(reasons)}"
    if len(accepted) < OVERRIDES_REQUIRED:
        have = ", ".join(accepted) or "none"
        return [], f"{OVERRIDES_REQUIRED} distinct approvers must sign it (valid: {have})"
    return list(accepted.values()), ""


@task(cache_policy=NO_CACHE)
def check_deploy_window(
    policy: ApprovalPolicy,
    environment: str,
    now: datetime,
    overrides: Sequence[Mapping[str, str]] | None,
    release: Callable[[], str],
    audit: tuple[WritableFileSystem, str],
) -> tuple[Freeze, str] | None:
    """None when `environment` is open at `now`; when it is frozen, the freeze and the
    release id two approvers' signed overrides let through; else PromotionRefused.

    `release` makes the plan's release id; it is called only when overrides are given
    (a refusal without any costs no plan). `audit` is (the ledger's store, this run's id):
    the refusal, each refused signature and each accepted override are recorded there.

    Raises:
        PromotionRefused: frozen, and no valid override (naming the freeze and why).
    """
    freeze = frozen_at(policy.deploy_windows.get(environment), now)
    if freeze is None:
        return None
    store, run_id = audit
    release_id = release() if overrides else ""
    judged = [_judge(o, environment, release_id, policy, now) for o in overrides or ()]
    accepted, missing = _overridden(judged)
    if accepted:
        for one in accepted:
            _audit(store, environment, run_id, release_id, one)
        run_logger().warning(
            "%s is frozen: %s; overridden for release %s by %s: %s",
            environment,
            freeze.describe(),
            release_id,
            ", ".join(one.claimed for one in accepted),
            accepted[0].reason,
        )
        return freeze, release_id
    for one in judged:
        if not one.accepted:
            _audit(store, environment, run_id, release_id, one)
    approvers = ", ".join(policy.override_approvers(environment)) or "nobody (none named)"
    why = missing if overrides else "no override given"
    msg = (
        f"{environment} is frozen at {now:%Y-%m-%d %H:%M} UTC: {freeze.describe()}; "
        f"nothing changed. {why}. Two of {approvers} may sign an override naming the reason "
        "(`cicd override-freeze`)"
    )
    record_decision(
        store,
        AuditEntry(
            environment=environment,
            run_id=run_id,
            release_id=release_id or "-",
            kind="frozen",
            who="-",
            detail=msg,
        ),
    )
    raise PromotionRefused(msg)


def require_overridden(window: tuple[Freeze, str] | None, release_id: str) -> None:
    """The release about to deploy is the one the freeze was overridden for.

    Raises:
        PromotionRefused: another release was planned since the override was checked.
    """
    if window is not None and window[1] != release_id:
        msg = (
            f"the freeze {window[0].describe()} was overridden for release {window[1]}, "
            f"but release {release_id} is about to deploy; nothing changed"
        )
        raise PromotionRefused(msg)

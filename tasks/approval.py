"""The production gate: what a promotion changes, and the approval form the server enforces.

Prefect OSS has no approver RBAC, so the form itself carries the rules: the model is
built per promotion with the allowlisted approvers minus the promoter as an enum and
the plan's release id as a pattern, and a JSON-schema condition makes `reason` required
when rejecting. The server validates a resume against that schema (from the UI, the
CLI or the API alike) and refuses anything else; the run stays paused. Nothing an
approver must type gets initial data: initial data would make the field optional.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field, create_model

from tasks.models import ImageRef

Decision = Literal["approve", "reject"]

# Reject needs a reason: required, and with at least one non-blank character.
_REASON_WHEN_REJECTING: dict[str, Any] = {
    "if": {"properties": {"decision": {"const": "reject"}}, "required": ["decision"]},
    "then": {"required": ["reason"], "properties": {"reason": {"pattern": r"\S"}}},
}


class PlannedChange(BaseModel):
    """One service of a promotion: what runs in the target now, and what replaces it."""

    model_config = ConfigDict(frozen=True)

    service: str
    current_digest: str | None = Field(description="Digest live in the target now, or None")
    current_commit: str = Field(default="", description="Commit of the current release")
    image: ImageRef = Field(description="The verified image from the source environment")
    scan: str | None = Field(default=None, description="Security scan verdict of the release")

    @property
    def new_digest(self) -> str:
        """The digest the promotion deploys."""
        return self.image.digest

    @property
    def unchanged(self) -> bool:
        """True when the target already runs this digest."""
        return self.current_digest == self.image.digest

    @property
    def commits(self) -> str:
        """`old..new` short commits, or the new commit alone when nothing ran before."""
        new = self.image.commit[:12] or "(unknown)"
        if self.current_commit and self.current_commit != self.image.commit:
            return f"{self.current_commit[:12]}..{new}"
        return new


class PromotionPlan(BaseModel):
    """What a promotion will deploy where, and who asked for it."""

    model_config = ConfigDict(frozen=True)

    environment: str = Field(description="The target environment")
    source_environment: str = Field(description="Where the releases were verified")
    release_id: str = Field(description="Short hash over the sorted service:digest pairs")
    changes: list[PlannedChange] = Field(description="One entry per promoted service")
    promoted_by: str = Field(description="Who started the promotion")

    @property
    def services(self) -> list[str]:
        """The promoted services, in plan order."""
        return [c.service for c in self.changes]

    def change(self, service: str) -> PlannedChange:
        """The planned change of `service`.

        Raises:
            KeyError: `service` is not part of the plan.
        """
        for change in self.changes:
            if change.service == service:
                return change
        msg = f"{service!r} is not part of promotion {self.release_id}"
        raise KeyError(msg)


def release_id(digests: dict[str, str]) -> str:
    """A short, order-independent id of a set of service -> digest pairs.

    Raises:
        ValueError: no services.
    """
    if not digests:
        msg = "a release needs at least one service"
        raise ValueError(msg)
    text = "\n".join(f"{service}:{digest}" for service, digest in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_plan(
    environment: str, source_environment: str, changes: list[PlannedChange], promoted_by: str
) -> PromotionPlan:
    """A plan whose release id is computed from its changes."""
    return PromotionPlan(
        environment=environment,
        source_environment=source_environment,
        release_id=release_id({c.service: c.new_digest for c in changes}),
        changes=changes,
        promoted_by=promoted_by,
    )


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
        ValueError: nobody is left (empty allowlist, or the promoter is the only one).
    """
    eligible = [a for a in dict.fromkeys(approvers) if a != promoted_by]
    if not eligible:
        msg = (
            f"nobody may approve a promotion by {promoted_by!r}: approvers are "
            f"{list(approvers)} and nobody approves their own promotion"
        )
        raise ValueError(msg)
    return eligible


def approval_model(plan: PromotionPlan, approvers: list[str] | tuple[str, ...]) -> type[RunInput]:
    """The approval form of `plan`, with the plan's markdown as its description.

    Fields: `approver` (one of `approvers` except the promoter), `release_id` (must be
    the plan's), `decision` (approve or reject), `reason` (required when rejecting).

    Raises:
        ValueError: nobody may approve (see `eligible_approvers`).
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

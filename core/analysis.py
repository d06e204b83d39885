"""Post-deploy analysis as pure policy: which PromQL checks judge a release, and how their
measurements add up to a verdict.

An environment's analysis lives in the approval policy on the protected branch
(`config/approvals.yaml`, `analysis: {ENV: ...}`, read by `blocks/approvals.py`), so
changing what judges a release takes a reviewed commit, like its gate. This module only
parses and evaluates; `tasks/analysis.py` queries Prometheus and drives the load.

A check passes when at least `count - failure_limit` of its measurements met its
condition; it fails when more than `failure_limit` did not; otherwise (no data, Prometheus
unreachable) it is inconclusive, which is never a pass.
"""

from __future__ import annotations

import itertools
import math
import re
from string import Template
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PLACEHOLDERS = frozenset({"service", "environment", "digest"})
"""What a query may name as `$service`, `$environment`, `$digest` (PromQL has no `$`)."""
Verdict = Literal["passed", "failed", "inconclusive"]
Rollout = Literal["in-place", "blue-green", "canary"]
GREEN_SUFFIX = "-green"
"""A blue-green promotion's green: its container's name is the serving one's plus this, and
its scrape `environment` label its environment's name plus this, so the policy's own
queries, rendered with `$environment` set to it, judge green alone."""
CANARY_SUFFIX = "-canary"
"""The same for a canary pod (its Deployment is `<service>-canary`, its pods labelled
`track: canary`, which the cluster's Prometheus relabels into `environment: <env>-canary`)."""
MAX_CANARY_REPLICAS = 20
MAX_CANARY_STEPS = 5
CanaryReplicas = Annotated[int, Field(ge=1, le=MAX_CANARY_REPLICAS)]
SERVICE_PORTS = (8001, 8012)
"""The catalogue's service ports: an offset serves offset + 8001 ... offset + 8012."""
HIGHEST_GREEN_PORT = 49_999
"""Green ports stay below the machine's ephemeral range (50000 and up)."""


class AnalysisCheck(BaseModel):
    """One PromQL query and the condition each of its measurements must meet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Names it in notices")
    query: str = Field(min_length=1, description="PromQL; one series or a scalar")
    below: float | None = Field(default=None, description="Each value must be below this")
    above: float | None = Field(default=None, description="Each value must be above this")
    below_previous: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Each value must be below this factor times the previous release's value of "
            "the same check, as its ledger record keeps it (none recorded: `below` alone, "
            "which a check with this factor must therefore give)"
        ),
    )

    @field_validator("query")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        unknown = sorted(
            {m.group("named") or m.group("braced") or "$" for m in _placeholders(value)}
            - PLACEHOLDERS
        )
        if unknown:
            msg = (
                f"unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                f"a query may name {', '.join('$' + p for p in sorted(PLACEHOLDERS))}"
            )
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _a_condition(self) -> AnalysisCheck:
        if self.below is None and self.above is None and self.below_previous is None:
            msg = f"check {self.name!r} has no condition: give below, above or below_previous"
            raise ValueError(msg)
        if self.below_previous is not None and self.below is None:
            msg = (
                f"check {self.name!r}: below_previous needs an absolute `below` as well, the "
                "bound of a release whose previous one recorded no value (a first release)"
            )
            raise ValueError(msg)
        return self

    def render(self, values: dict[str, str]) -> str:
        """The query with its placeholders filled in."""
        return Template(self.query).substitute(values)


def green_overlaps(green_offset: int, offsets: dict[str, int]) -> list[str]:
    """The environments (name -> local_port_offset) whose ports a green offset would share."""
    span = SERVICE_PORTS[1] - SERVICE_PORTS[0]
    return sorted(name for name, offset in offsets.items() if abs(offset - green_offset) <= span)


def _placeholders(query: str) -> list[re.Match[str]]:
    return [m for m in Template.pattern.finditer(query) if m.group("escaped") is None]


class AnalysisPolicy(BaseModel):
    """An environment's analysis: the checks, how often and how long, and what an
    inconclusive analysis does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checks: tuple[AnalysisCheck, ...] = Field(min_length=1)
    bake_s: float = Field(
        default=60, ge=0, le=86_400, description="Load before the first measurement"
    )
    interval_s: float = Field(default=30, gt=0, le=3600, description="Between measurements")
    count: int = Field(default=5, ge=1, le=1000, description="Measurements of each check")
    failure_limit: int = Field(default=0, ge=0, description="Failed measurements tolerated")
    inconclusive: Literal["fail"] = Field(
        default="fail", description="What an inconclusive analysis does to the release"
    )
    rollout: Rollout = Field(
        default="in-place",
        description=(
            "in-place: the release replaces the serving one, then is judged (rolled back on "
            "a failure); blue-green (docker target): judged on green ports first, the "
            "serving release untouched until it passes; canary (kubernetes target): "
            "judged as a canary Deployment beside the stable one, under the same Service"
        ),
    )
    canary_replicas: tuple[CanaryReplicas, ...] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CANARY_STEPS,
        description=(
            "canary: the canary Deployment's replicas beside stable's (default 1), or its "
            "steps, each judged before the next, for example [1, 3]"
        ),
    )
    green_port_offset: int | None = Field(
        default=None,
        ge=1000,
        le=HIGHEST_GREEN_PORT - SERVICE_PORTS[1],
        description="blue-green: green containers listen on this offset + the service's port",
    )

    @field_validator("inconclusive", mode="before")
    @classmethod
    def _inconclusive(cls, value: Any) -> Any:
        if value == "approve":
            msg = (
                "'approve' (ask for an approval when the analysis is inconclusive) is not "
                "supported yet; 'fail' is the only value"
            )
            raise ValueError(msg)
        return value

    @field_validator("canary_replicas", mode="before")
    @classmethod
    def _one_step(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("canary_replicas")
    @classmethod
    def _growing(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(b <= a for a, b in itertools.pairwise(value)):
            msg = f"canary steps must grow, each above the one before: {list(value)}"
            raise ValueError(msg)
        return value

    @property
    def canary_steps(self) -> tuple[int, ...]:
        """The canary's replicas at each step (one step of one replica unless told)."""
        return self.canary_replicas or (1,)

    @model_validator(mode="after")
    def _rollout(self) -> AnalysisPolicy:
        if self.rollout == "blue-green" and self.green_port_offset is None:
            msg = (
                "green_port_offset is required with rollout: blue-green (green containers "
                "listen on green_port_offset + the service's port)"
            )
            raise ValueError(msg)
        if self.rollout != "blue-green" and self.green_port_offset is not None:
            msg = (
                f"green_port_offset is given but rollout is {self.rollout}: set rollout: blue-green"
            )
            raise ValueError(msg)
        if self.rollout != "canary" and self.canary_replicas is not None:
            msg = f"canary_replicas is given but rollout is {self.rollout}: set rollout: canary"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisPolicy:
        if self.failure_limit >= self.count:
            msg = f"failure_limit {self.failure_limit} must be below count {self.count}"
            raise ValueError(msg)
        names = [c.name for c in self.checks]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            msg = f"check names must be unique: {', '.join(doubled)}"
            raise ValueError(msg)
        return self


class Limit(BaseModel):
    """The condition one check's measurements are judged by (both bounds exclusive)."""

    model_config = ConfigDict(frozen=True)

    below: float | None = None
    above: float | None = None

    def met(self, value: float) -> bool:
        """True when `value` meets every bound (NaN never does)."""
        if math.isnan(value):
            return False
        if self.below is not None and not value < self.below:
            return False
        return self.above is None or value > self.above

    def describe(self) -> str:
        parts = []
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        return " and ".join(parts)


def limit_of(check: AnalysisCheck, previous: float | None) -> Limit:
    """The bounds of `check` given the previous release's value of it (None: not recorded)."""
    below = check.below
    if check.below_previous is not None and previous is not None and not math.isnan(previous):
        relative = check.below_previous * previous
        below = relative if below is None else min(below, relative)
    return Limit(below=below, above=check.above)


class CheckResult(BaseModel):
    """One check of one service: what was asked, measured, and decided."""

    model_config = ConfigDict(frozen=True)

    service: str
    check: str
    query: str
    limit: Limit
    values: tuple[float | None, ...] = Field(
        default=(), description="Each measurement; None: no answer (reason in `problems`)"
    )
    problems: tuple[str, ...] = Field(default=(), description="Why measurements had no value")

    @property
    def failed(self) -> int:
        return sum(1 for v in self.values if v is not None and not self.limit.met(v))

    @property
    def met(self) -> int:
        return sum(1 for v in self.values if v is not None and self.limit.met(v))

    def verdict(self, policy: AnalysisPolicy) -> Verdict | None:
        """The decided verdict, or None while more measurements could still change it."""
        if self.failed > policy.failure_limit:
            return "failed"
        if self.met >= policy.count - policy.failure_limit:
            return "passed"
        remaining = policy.count - len(self.values)
        if self.met + remaining < policy.count - policy.failure_limit:
            return "inconclusive"
        return None

    def with_value(self, value: float | None, problem: str = "") -> CheckResult:
        problems = (*self.problems, problem) if problem else self.problems
        return self.model_copy(update={"values": (*self.values, value), "problems": problems})

    def shown_values(self) -> str:
        return ", ".join("no data" if v is None else f"{v:.4g}" for v in self.values)

    def summary(self, policy: AnalysisPolicy) -> str:
        """One line for a notice: the query, the measured values and the limit."""
        line = (
            f"{self.service}: {self.check} `{self.query}` measured {self.shown_values() or '-'} "
            f"(limit {self.limit.describe()}; {self.failed} failed, "
            f"{policy.failure_limit} allowed, {policy.count} measurements)"
        )
        if self.problems:
            line += f": {self.problems[-1]}"
        return line


def overall(results: list[CheckResult], policy: AnalysisPolicy) -> Verdict:
    """failed if any check failed; inconclusive if any could not be judged; else passed."""
    verdicts = [r.verdict(policy) or "inconclusive" for r in results]
    if "failed" in verdicts:
        return "failed"
    if "inconclusive" in verdicts:
        return "inconclusive"
    return "passed"


def decided(results: list[CheckResult], policy: AnalysisPolicy) -> bool:
    """True when the analysis may stop: a check failed or could no longer pass, or every
    check is decided."""
    verdicts = [r.verdict(policy) for r in results]
    return "failed" in verdicts or "inconclusive" in verdicts or all(verdicts)

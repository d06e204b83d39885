"""Records that pass between tasks: stage results, CI outcomes, images, deployments, health,
promotion plans.

The bottom layer: imports nothing of the project.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StageStatus = Literal["passed", "failed", "skipped", "cached"]


def utcnow() -> datetime:
    """Now, timezone-aware."""
    return datetime.now(UTC)


def short_digest(digest: str) -> str:
    """The first 12 hex digits of a `sha256:` digest (or of a bare hex digest)."""
    return digest.removeprefix("sha256:")[:12]


class StageResult(BaseModel):
    """The outcome of one stage (lock, ruff, pytest, image, deploy...) for one service."""

    model_config = ConfigDict(frozen=True)

    service: str
    stage: str
    status: StageStatus
    seconds: float = 0.0
    summary: str = ""
    excerpt: str = ""
    details: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class Workspace(BaseModel):
    """One run's worktree: where it is, which commit it holds, and whether that may ship."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="The worktree the run checks")
    mirror: str = Field(description="The shared mirror the worktree belongs to")
    repository: str = Field(description="The repository's name, else its URL")
    commit: str = Field(description="The exact commit checked out (40 hex)")
    ref: str = Field(description="The ref the commit was asked by, e.g. refs/heads/main")
    protected: bool = Field(description="The commit is on the protected branch")
    protected_branch: str = Field(description="The protected branch's name")


class ImageRef(BaseModel):
    """An image in a registry, addressed by digest."""

    model_config = ConfigDict(frozen=True)

    service: str
    repository: str = Field(description="registry host/path, e.g. 127.0.0.1:5000/elice/auth")
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    tag: str = ""
    version: str = ""
    commit: str = ""

    @property
    def reference(self) -> str:
        """repository@digest: what a deploy runs."""
        return f"{self.repository}@{self.digest}"

    @property
    def short(self) -> str:
        """The first 12 hex digits of the digest."""
        return short_digest(self.digest)


class DeployedService(BaseModel):
    """What serves a service in an environment."""

    model_config = ConfigDict(frozen=True)

    service: str
    environment: str
    image: ImageRef
    address: str = Field(description="Base URL of the service, e.g. http://127.0.0.1:18001")
    deployed_at: datetime = Field(default_factory=utcnow)
    target: str = Field(default="docker", description="docker or kubernetes")


class PublishedImage(BaseModel):
    """The image a service ships as, and whether it was built now or found."""

    image: ImageRef
    reused: bool

    def summary_line(self) -> str:
        """One line for the CI report."""
        how = "already published" if self.reused else "built and pushed"
        return f"{how} {self.image.tag} @ {self.image.short}"

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"digest": self.image.digest, "version": self.image.version}


class DeployOutcome(BaseModel):
    """Where a service serves after the deploy step, and whether it changed."""

    deployed: DeployedService
    changed: bool
    previous: DeployedService | None = Field(
        default=None, description="What served before a deploy that changed it (None: nothing)"
    )

    def summary_line(self) -> str:
        """One line for the CI report."""
        how = "deployed" if self.changed else "already serves"
        where = f"{self.deployed.environment} at {self.deployed.address}"
        return f"{how} {self.deployed.image.short} in {where}"

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"address": self.deployed.address, "digest": self.deployed.image.digest}


# --- health ------------------------------------------------------------------------


class HealthResult(BaseModel):
    """What a health probe saw; `failures` is empty when `ok`."""

    model_config = ConfigDict(frozen=True)

    service: str
    url: str = Field(description="Base URL that was probed")
    ok: bool
    attempts: int
    seconds: float
    failures: list[str] = Field(default_factory=list, description="endpoint: what it answered")
    version: dict[str, str] = Field(default_factory=dict, description="GET /version, if read")

    def summary_line(self) -> str:
        """One line for the CI report."""
        if self.ok:
            return f"healthy at {self.url} after {self.seconds:.1f}s"
        return f"unhealthy at {self.url}: {'; '.join(self.failures)}"

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"address": self.url}


class HealthReport(BaseModel):
    """Every checked service's health in one environment."""

    environment: str
    results: list[HealthResult]

    @property
    def failed(self) -> list[HealthResult]:
        """The unhealthy services."""
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        """Something was checked, and all of it is healthy."""
        return bool(self.results) and not self.failed

    def as_json(self) -> dict[str, Any]:
        """`cicd health --json`: the environment, ok, and one object per service."""
        fields = {"service", "url", "ok", "attempts", "seconds", "failures"}
        return {
            "environment": self.environment,
            "ok": self.ok,
            "services": [r.model_dump(mode="json", include=fields) for r in self.results],
        }


# --- promotion ---------------------------------------------------------------------


class PlannedChange(BaseModel):
    """One service of a promotion: what runs in the target now, and what replaces it."""

    model_config = ConfigDict(frozen=True)

    service: str
    current_digest: str | None = Field(description="Digest live in the target now, or None")
    current_commit: str = Field(default="", description="Commit of the current release")
    image: ImageRef = Field(description="The verified image from the source environment")
    scan: str | None = Field(default=None, description="Security scan verdict of the release")
    repository: str = Field(default="", description="The repository the release was built from")
    ref: str = Field(default="", description="The protected branch's ref it shipped from")
    commit: str = Field(default="", description="The commit CI checked when it shipped it")

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


class CiOutcome(BaseModel):
    """What a CI run found."""

    commit: str = Field(default="", description="The exact commit checked")
    ref: str = Field(default="", description="The ref it was checked for")
    protected: bool = Field(default=False, description="The commit is on the protected branch")
    shipped: bool = Field(
        default=False, description="Delivered: deployed and recorded (protected branch only)"
    )
    affected: list[str] = Field(default_factory=list, description="Services the run checked")
    results: list[StageResult] = Field(default_factory=list, description="Every stage's result")
    failed: dict[str, str] = Field(
        default_factory=dict, description="Failed service -> 'stage: summary'"
    )
    nothing_to_do: bool = Field(default=False, description="No service was affected")
    message: str = Field(default="", description="One line on the run")


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

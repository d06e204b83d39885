"""Records that pass between tasks: stage results, images, deployments."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StageStatus = Literal["passed", "failed", "skipped", "cached"]


def utcnow() -> datetime:
    """Now, timezone-aware."""
    return datetime.now(UTC)


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
        return self.digest.removeprefix("sha256:")[:12]


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

    def summary_line(self) -> str:
        """One line for the CI report."""
        how = "deployed" if self.changed else "already serves"
        where = f"{self.deployed.environment} at {self.deployed.address}"
        return f"{how} {self.deployed.image.short} in {where}"

    def report_details(self) -> dict[str, str]:
        """Columns for the CI report."""
        return {"address": self.deployed.address, "digest": self.deployed.image.digest}

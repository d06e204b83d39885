"""The release ledger's records and revisions, as plain data; no Prefect.

Every change of an environment writes a new immutable revision file
`<env>/<revision:08d>.json` (`tasks.releases.Ledger`); these are its models, and what
reading one takes, shared by the flows' ledger and the read commands (`cicd status`).
The bottom layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import LedgerError
from core.records import DeployedService, ImageRef, utcnow

ENV_NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
_REVISION_FILE = re.compile(r"^(\d{8})\.json$")

ScanVerdict = Literal["clean", "vulnerable", "unknown"]


class ReleaseRecord(BaseModel):
    """One service's release in one environment."""

    model_config = ConfigDict(frozen=True)

    service: str
    environment: str
    image: ImageRef
    release_id: str = Field(min_length=1, description="The promotion or CI run that shipped it")
    deployed_at: datetime = Field(default_factory=utcnow)
    flow_run_id: str | None = None
    verified: bool = False
    baseline: dict[str, float] | None = Field(
        default=None, description="Performance baseline measured after the deploy"
    )
    analysis: str | None = Field(
        default=None, description="The post-deploy analysis' verdict and what it rested on"
    )
    approved_by: str | None = None
    promoted_by: str | None = None
    scan: ScanVerdict | None = None
    scan_override: str | None = Field(
        default=None, description="Why an unknown scan result was accepted, and by whom"
    )
    repository: str = Field(default="", description="The repository the release was built from")
    ref: str = Field(
        default="", description="The protected branch's ref the commit was on when CI shipped it"
    )
    commit: str = Field(default="", description="The commit CI checked when it shipped this")


class DeployIntent(BaseModel):
    """A promotion's deploys under way, written before the first one changes anything.

    The revision that records the promotion (or its rollback) clears it. Found by another
    run, it means the run that wrote it died mid-deploy: that run's lock has expired, so
    the environment may be mixed, and `previous` says what to put back.
    """

    model_config = ConfigDict(frozen=True)

    release_id: str = Field(min_length=1)
    flow_run_id: str = Field(min_length=1, description="The promote run deploying it")
    started_at: datetime = Field(default_factory=utcnow)
    images: dict[str, ImageRef] = Field(description="What each service is being moved to")
    previous: dict[str, DeployedService | None] = Field(
        description="What served each service before (None: nothing)"
    )


class EnvironmentState(BaseModel):
    """One revision of an environment's ledger."""

    model_config = ConfigDict(frozen=True)

    environment: str
    revision: int = Field(default=0, ge=0, description="0: nothing recorded yet")
    services: dict[str, ReleaseRecord] = Field(
        default_factory=dict, description="What serves now, by service"
    )
    previous: dict[str, ReleaseRecord] = Field(
        default_factory=dict, description="What served before each service's last change"
    )
    in_progress: DeployIntent | None = Field(
        default=None, description="A promotion deploying now (or interrupted while deploying)"
    )
    change: str = Field(default="", description="What this revision changed, in words")
    updated_at: datetime = Field(default_factory=utcnow)


def check_environment_name(env: str) -> str:
    """`env` when it is a safe path component (a DNS-1123 label).

    Raises:
        ValueError: the name could escape its folder or is not a label.
    """
    if not ENV_NAME.match(env):
        msg = f"environment name {env!r} is not a DNS-1123 label"
        raise ValueError(msg)
    return env


def revision_numbers(names: Iterable[str]) -> list[int]:
    """The revisions among an environment folder's file names, sorted."""
    return sorted(int(m.group(1)) for m in map(_REVISION_FILE.match, names) if m)


def revision_path(env: str, revision: int) -> str:
    """Where revision `revision` of `env` lives in the ledger's store."""
    return f"{env}/{revision:08d}.json"


def parse_revision(path: str, data: bytes | None) -> EnvironmentState:
    """The revision stored at `path` (`data`: its bytes, None when it could not be read).

    Raises:
        LedgerError: listed but unreadable, or corrupt.
    """
    if data is None:
        msg = f"ledger revision {path} is listed but cannot be read"
        raise LedgerError(msg)
    try:
        return EnvironmentState.model_validate_json(data)
    except ValidationError as exc:
        msg = f"ledger revision {path} is corrupt: {exc.error_count()} validation errors"
        raise LedgerError(msg) from exc

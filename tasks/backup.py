"""Backups taken before a deploy: the ledger, the live digests and the rendered manifests.

A backup is one JSON bundle `<env>/<timestamp>-<id>.json` on the backup filesystem, created
exclusively and never changed. Restoring is deciding what to redeploy (`restore_targets`);
the flow or the CLI does the redeploy.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import BackupError
from core.ledger import EnvironmentState, check_environment_name
from core.records import DeployedService, ImageRef, utcnow
from tasks.process import run_logger
from tasks.stores import ObjectStore, open_store

BACKUP_ID = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{8}$")


class Backup(BaseModel):
    """What an environment looked like before a change."""

    model_config = ConfigDict(frozen=True)

    backup_id: str
    environment: str
    created_at: datetime = Field(default_factory=utcnow)
    ledger: EnvironmentState = Field(description="The ledger revision at backup time")
    live: dict[str, DeployedService | None] = Field(
        description="What actually served each service (None: not deployed)"
    )
    manifests: list[dict[str, Any]] | None = Field(
        default=None, description="Rendered manifests (kubernetes target), if any"
    )


def new_backup_id(now: datetime | None = None) -> str:
    """`<UTC timestamp, ms>-<8 hex>`: sorts by time, unique across concurrent writers."""
    moment = (now or utcnow()).astimezone(UTC)
    millis = moment.microsecond // 1000
    return f"{moment:%Y%m%dT%H%M%S}{millis:03d}Z-{uuid.uuid4().hex[:8]}"


def _store(fs: WritableFileSystem) -> ObjectStore:
    return open_store(fs)


def restore_targets(backup: Backup) -> dict[str, ImageRef | None]:
    """What to redeploy to return to `backup`: service -> image (None: remove the service).

    The live digests win: they are what served, even when the ledger disagreed.
    """
    targets: dict[str, ImageRef | None] = {
        name: record.image for name, record in backup.ledger.services.items()
    }
    for name, deployed in backup.live.items():
        targets[name] = deployed.image if deployed is not None else None
    return dict(sorted(targets.items()))


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def backup_environment(
    env_name: str,
    state: EnvironmentState,
    live: dict[str, DeployedService | None],
    manifests: list[dict[str, Any]] | None = None,
    *,
    fs: WritableFileSystem,
) -> str:
    """Write a backup bundle of `env_name`; returns the backup id.

    Raises:
        ValueError: bad environment name, or `state`/`live` belong to another environment.
        BackupError: the bundle could not be written.
    """
    check_environment_name(env_name)
    if state.environment != env_name:
        msg = f"ledger state of {state.environment!r} given for a backup of {env_name!r}"
        raise ValueError(msg)
    strangers = sorted(n for n, d in live.items() if d is not None and d.environment != env_name)
    if strangers:
        msg = f"live services {strangers} are not deployed in {env_name!r}"
        raise ValueError(msg)
    backup = Backup(
        backup_id=new_backup_id(),
        environment=env_name,
        ledger=state,
        live=live,
        manifests=manifests,
    )
    store = _store(fs)
    path = f"{env_name}/{backup.backup_id}.json"
    if not store.create(path, backup.model_dump_json(indent=2).encode()):
        msg = f"backup {path} already exists"
        raise BackupError(msg)
    run_logger().info(
        "backup %s of %s: ledger revision %s, %d live services",
        backup.backup_id,
        env_name,
        state.revision,
        sum(1 for d in live.values() if d is not None),
    )
    return backup.backup_id


def list_backups(env: str, *, fs: WritableFileSystem) -> list[str]:
    """Backup ids of `env`, oldest first."""
    check_environment_name(env)
    names = _store(fs).names(env)
    return [n.removesuffix(".json") for n in names if BACKUP_ID.match(n.removesuffix(".json"))]


def load_backup(env: str, backup_id: str, *, fs: WritableFileSystem) -> Backup:
    """Read one backup.

    Raises:
        ValueError: malformed environment name or backup id.
        BackupError: no such backup, or it is corrupt.
    """
    check_environment_name(env)
    if not BACKUP_ID.match(backup_id):
        msg = f"malformed backup id {backup_id!r}; expected <YYYYmmddTHHMMSSmmmZ>-<8 hex>"
        raise ValueError(msg)
    data = _store(fs).read(f"{env}/{backup_id}.json")
    if data is None:
        msg = f"no backup {backup_id} for {env}; `list_backups({env!r})` shows the ones there"
        raise BackupError(msg)
    try:
        backup = Backup.model_validate_json(data)
    except ValidationError as exc:
        msg = f"backup {env}/{backup_id} is corrupt: {exc.error_count()} validation errors"
        raise BackupError(msg) from exc
    if backup.environment != env or backup.backup_id != backup_id:
        msg = f"backup {env}/{backup_id} holds {backup.environment}/{backup.backup_id}"
        raise BackupError(msg)
    return backup


def latest_backup(env: str, *, fs: WritableFileSystem) -> Backup | None:
    """The newest backup of `env`, None when there is none."""
    ids = list_backups(env, fs=fs)
    return load_backup(env, ids[-1], fs=fs) if ids else None

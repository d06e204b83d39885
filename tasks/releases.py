"""The release ledger: per environment, what serves, what served before, who approved it.

Every change writes a new immutable revision file `<env>/<revision:08d>.json`; nothing is
ever overwritten. Creation is exclusive (a hard link on a local disk, a conditional
`PutObject` with `If-None-Match: *` on S3), so two writers racing for revision N cannot
both win: the loser re-reads the ledger and re-applies its change.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from botocore.exceptions import ClientError
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect_aws import S3Bucket
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blocks.storage import ledger_filesystem
from tasks.exceptions import PipelineError
from tasks.models import ImageRef, utcnow
from tasks.process import run_logger

ENV_NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
_REVISION_FILE = re.compile(r"^(\d{8})\.json$")
MAX_ATTEMPTS = 8

ScanVerdict = Literal["clean", "vulnerable", "unknown"]


class LedgerError(PipelineError):
    """The ledger cannot be read or written."""


class LedgerConflict(LedgerError):
    """Other writers kept winning the race for the next revision; nothing was written."""


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
    approved_by: str | None = None
    promoted_by: str | None = None
    scan: ScanVerdict | None = None
    scan_override: str | None = Field(
        default=None, description="Why an unknown scan result was accepted, and by whom"
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


# --- exclusive-create object stores over the two filesystem blocks ---------------------


class ObjectStore(Protocol):
    """The three operations the ledger and the backups need."""

    def read(self, path: str) -> bytes | None:
        """The object's bytes, None when it does not exist."""
        ...

    def create(self, path: str, data: bytes) -> bool:
        """Create the object only if it does not exist; False when it already did."""
        ...

    def names(self, folder: str) -> list[str]:
        """File names (no folders) directly under `folder`, sorted."""
        ...


class LocalStore:
    """A LocalFileSystem block's directory."""

    def __init__(self, fs: LocalFileSystem) -> None:
        self.fs = fs

    def _path(self, path: str) -> Path:
        return Path(self.fs._resolve_path(path))  # the block's own path guard

    def read(self, path: str) -> bytes | None:
        """The file's bytes, None when missing."""
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError:
            return None

    def create(self, path: str, data: bytes) -> bool:
        """Write to a temporary file, then hard-link it into place: atomic and exclusive."""
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True

    def names(self, folder: str) -> list[str]:
        """Files directly in `folder`, temporary files excluded."""
        directory = self._path(folder)
        if not directory.is_dir():
            return []
        return sorted(
            p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
        )


class S3Store:
    """An S3Bucket block's folder.

    Exclusive creation relies on conditional writes, atomic on S3 (since 2024-08) and MinIO.
    moto (5.2) honours If-None-Match but checks it without a lock: it stops sequential
    conflicts, not truly simultaneous PUTs; the concurrency test runs on local disk.
    """

    def __init__(self, bucket: S3Bucket) -> None:
        self.bucket = bucket
        self._client: Any = None

    @property
    def client(self) -> Any:
        """One boto3 S3 client per store."""
        if self._client is None:
            self._client = self.bucket.credentials.get_s3_client()
        return self._client

    def _key(self, path: str) -> str:
        return self.bucket._resolve_path(path)  # same keys as write_path

    def read(self, path: str) -> bytes | None:
        """The object's bytes, None when missing."""
        try:
            answer = self.client.get_object(Bucket=self.bucket.bucket_name, Key=self._key(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise LedgerError(f"cannot read s3 key {self._key(path)}: {_aws_error(exc)}") from None
        body: bytes = answer["Body"].read()
        return body

    def create(self, path: str, data: bytes) -> bool:
        """PutObject with If-None-Match: * ; 412 PreconditionFailed means someone else won."""
        try:
            self.client.put_object(
                Bucket=self.bucket.bucket_name,
                Key=self._key(path),
                Body=data,
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            # 409 ConditionalRequestConflict: a concurrent conditional write is in flight.
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            raise LedgerError(f"cannot write s3 key {self._key(path)}: {_aws_error(exc)}") from None
        return True

    def names(self, folder: str) -> list[str]:
        """Object names directly under `folder`."""
        prefix = self._key(folder).rstrip("/") + "/"
        found: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket.bucket_name, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                found.extend(item["Key"][len(prefix) :] for item in page.get("Contents", []))
        except ClientError as exc:
            raise LedgerError(f"cannot list s3 prefix {prefix}: {_aws_error(exc)}") from None
        return sorted(found)


def _aws_error(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')}: {error.get('Message', '')}"


def open_store(fs: WritableFileSystem) -> ObjectStore:
    """The exclusive-create store for a filesystem block.

    Raises:
        TypeError: the block is neither a LocalFileSystem nor an S3Bucket.
    """
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs)
    if isinstance(fs, S3Bucket):
        return S3Store(fs)
    msg = f"{type(fs).__name__} cannot create files exclusively; use LocalFileSystem or S3Bucket"
    raise TypeError(msg)


# --- the ledger -----------------------------------------------------------------------


class Ledger:
    """Per-environment release ledger with immutable, exclusively created revisions."""

    def __init__(self, fs: WritableFileSystem | None = None, *, max_attempts: int = MAX_ATTEMPTS):
        if max_attempts < 1:
            msg = f"max_attempts must be at least 1, got {max_attempts}"
            raise ValueError(msg)
        self.store = open_store(fs if fs is not None else ledger_filesystem())
        self.max_attempts = max_attempts

    def _revisions(self, env: str) -> list[int]:
        numbers = []
        for name in self.store.names(env):
            match = _REVISION_FILE.match(name)
            if match:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def _read(self, env: str, revision: int) -> EnvironmentState:
        path = f"{env}/{revision:08d}.json"
        data = self.store.read(path)
        if data is None:
            msg = f"ledger revision {path} is listed but cannot be read"
            raise LedgerError(msg)
        try:
            return EnvironmentState.model_validate_json(data)
        except ValidationError as exc:
            msg = f"ledger revision {path} is corrupt: {exc.error_count()} validation errors"
            raise LedgerError(msg) from None

    def current(self, env: str) -> EnvironmentState:
        """The latest revision, or an empty revision 0 when nothing is recorded."""
        check_environment_name(env)
        revisions = self._revisions(env)
        if not revisions:
            return EnvironmentState(environment=env)
        return self._read(env, revisions[-1])

    def history(self, env: str) -> list[EnvironmentState]:
        """Every revision, oldest first."""
        check_environment_name(env)
        return [self._read(env, number) for number in self._revisions(env)]

    def update(
        self, env: str, change: Callable[[EnvironmentState], EnvironmentState]
    ) -> EnvironmentState:
        """Apply `change` to the latest revision and write the result as the next one.

        `change` may run more than once (after losing a race), so it must be pure.

        Raises:
            LedgerConflict: every attempt lost the race to another writer.
            ValueError: `env` is not a valid environment name.
        """
        check_environment_name(env)
        for _ in range(self.max_attempts):
            latest = self.current(env)
            changed = change(latest.model_copy(deep=True))
            written = changed.model_copy(
                update={"environment": env, "revision": latest.revision + 1, "updated_at": utcnow()}
            )
            # Re-validate: `change` may have built records by hand.
            written = EnvironmentState.model_validate(written.model_dump())
            data = written.model_dump_json(indent=2).encode()
            if self.store.create(f"{env}/{written.revision:08d}.json", data):
                return written
        msg = (
            f"ledger {env}: {self.max_attempts} attempts lost the race for the next revision; "
            "another deploy is writing this environment, retry when it has finished"
        )
        raise LedgerConflict(msg)

    def record_deploy(self, env: str, record: ReleaseRecord) -> EnvironmentState:
        """`record` now serves; the record it replaces becomes the service's previous one.

        Raises:
            ValueError: the record belongs to another environment.
        """
        if record.environment != env:
            msg = f"record for {record.environment!r} cannot be written to ledger {env!r}"
            raise ValueError(msg)
        return self.update(env, lambda state: with_deploy(state, record))

    def mark_verified(
        self,
        env: str,
        service: str,
        baseline: dict[str, float] | None,
        *,
        release_id: str | None = None,
    ) -> EnvironmentState:
        """Mark what serves `service` as verified, with its performance baseline.

        Raises:
            LedgerError: nothing serves `service`, or (with `release_id`) another release does.
        """
        return self.update(env, lambda state: with_verified(state, service, baseline, release_id))

    def restore_previous(self, env: str, service: str) -> EnvironmentState:
        """Rollback bookkeeping: the previous record serves again (none: the service is gone).

        Raises:
            LedgerError: there is nothing to roll back (neither current nor previous record).
        """
        return self.update(env, lambda state: with_previous_restored(state, service))


def with_deploy(state: EnvironmentState, record: ReleaseRecord) -> EnvironmentState:
    """`state` with `record` serving and the replaced record kept as previous."""
    services = dict(state.services)
    previous = dict(state.previous)
    old = services.get(record.service)
    if old is not None and old.image.digest != record.image.digest:
        previous[record.service] = old
    elif old is None:
        previous.pop(record.service, None)
    # Re-deploying the same digest keeps the earlier previous: a rollback target must differ.
    services[record.service] = record
    return state.model_copy(update={"services": services, "previous": previous})


def with_verified(
    state: EnvironmentState,
    service: str,
    baseline: dict[str, float] | None,
    release_id: str | None = None,
) -> EnvironmentState:
    """`state` with the serving record of `service` marked verified."""
    record = state.services.get(service)
    if record is None:
        msg = f"ledger {state.environment}: nothing serves {service}, cannot mark it verified"
        raise LedgerError(msg)
    if release_id is not None and record.release_id != release_id:
        msg = (
            f"ledger {state.environment}: {service} is served by release {record.release_id}, "
            f"not {release_id}; not marking it verified"
        )
        raise LedgerError(msg)
    services = {
        **state.services,
        service: record.model_copy(update={"verified": True, "baseline": baseline}),
    }
    return state.model_copy(update={"services": services})


def with_previous_restored(state: EnvironmentState, service: str) -> EnvironmentState:
    """`state` after rolling `service` back to its previous record.

    The previous entry is consumed: a second rollback cannot flip back to the bad release.
    """
    if service not in state.services and service not in state.previous:
        msg = f"ledger {state.environment}: no record of {service}, nothing to roll back"
        raise LedgerError(msg)
    services = dict(state.services)
    previous = dict(state.previous)
    restored = previous.pop(service, None)
    if restored is None:
        services.pop(service, None)
    else:
        services[service] = restored
    return state.model_copy(update={"services": services, "previous": previous})


def ledger_markdown(state: EnvironmentState) -> str:
    """The ledger revision as a Markdown table (one row per service)."""
    lines = [
        f"# Release ledger: {state.environment}",
        "",
        f"Revision {state.revision}, updated {state.updated_at:%Y-%m-%d %H:%M:%S %Z}.",
        "",
    ]
    if not state.services:
        lines.append("_Nothing deployed._")
        return "\n".join(lines) + "\n"
    lines += [
        "| service | digest | release | deployed | verified | approved by | scan | previous |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(state.services):
        rec = state.services[name]
        prev = state.previous.get(name)
        cells = [
            name,
            f"`{rec.image.short}`",
            _cell(rec.release_id),
            f"{rec.deployed_at:%Y-%m-%d %H:%M}",
            "yes" if rec.verified else "no",
            _cell(rec.approved_by or "-"),
            rec.scan or "-",
            f"`{prev.image.short}` ({_cell(prev.release_id)})" if prev else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def publish_ledger_artifact(env: str, state: EnvironmentState | None = None) -> str:
    """Publish the ledger of `env` as a markdown artifact keyed `ledger-<env>`; returns its id."""
    check_environment_name(env)
    current = state if state is not None else Ledger().current(env)
    artifact_id = create_markdown_artifact(
        markdown=ledger_markdown(current),
        key=f"ledger-{env}",
        description=f"Release ledger of {env}, revision {current.revision}",
    )
    run_logger().info("ledger %s: revision %s published", env, current.revision)
    return str(artifact_id)

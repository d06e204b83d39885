"""Where the release ledger and the environment backups live: a local directory or S3."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from prefect.blocks.core import Block
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect_aws import AwsCredentials, S3Bucket
from pydantic import ConfigDict, Field, model_validator

from core.errors import ConfigError
from core.settings import Settings
from core.trust import TrustRoots

STORAGE_BLOCK = "elice-release-storage"
_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class ReleaseStorage(Block):
    """The place that keeps the release ledger and the environment backups."""

    # Validation errors must not echo the raw input: its credentials hold the secret key.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Elice Release Storage"
    _description = "Ledger and backups: a local directory or an S3 (or MinIO) bucket and prefix."

    kind: Literal["local", "s3"] = Field(default="local", description="local or s3")
    path: str = Field(
        default="", description="local: base directory (default: the state dir, ELICE_STATE_DIR)"
    )
    bucket: str = Field(default="", description="s3: bucket name")
    prefix: str = Field(default="elice", description="s3: key prefix, without slashes at the ends")
    credentials: AwsCredentials | None = Field(
        default=None, description="s3: AWS credentials (default: the ambient AWS configuration)"
    )
    endpoint_url: str | None = Field(
        default=None, description="s3: endpoint of an S3-compatible store (MinIO, moto)"
    )

    @model_validator(mode="after")
    def _check(self) -> ReleaseStorage:
        if self.kind == "s3":
            if not re.match(_BUCKET, self.bucket):
                msg = f"kind s3 needs a valid bucket name, got {self.bucket!r}"
                raise ValueError(msg)
            if self.prefix != self.prefix.strip("/"):
                msg = f"prefix must not start or end with '/', got {self.prefix!r}"
                raise ValueError(msg)
        elif self.bucket:
            msg = "bucket is only meaningful with kind s3"
            raise ValueError(msg)
        return self

    def filesystem(
        self, area: Literal["ledger", "backups"], state_dir: Path | None = None
    ) -> WritableFileSystem:
        """The filesystem block holding `area` (ledger or backups); `state_dir` is the
        base of a local one without a path (the user setting ELICE_STATE_DIR).

        Raises:
            ConfigError: a local storage without a path, and no `state_dir` given.
        """
        if self.kind == "local":
            if self.path:
                base = Path(self.path).expanduser()
            elif state_dir is not None:
                base = state_dir
            else:
                msg = "a local release storage without a path needs the state dir"
                raise ConfigError(msg)
            folder = base / area
            folder.mkdir(parents=True, exist_ok=True)
            return LocalFileSystem(basepath=str(folder))
        credentials = self.credentials or AwsCredentials()
        if self.endpoint_url:
            params = credentials.aws_client_parameters.model_copy(
                update={"endpoint_url": self.endpoint_url}
            )
            credentials = credentials.model_copy(update={"aws_client_parameters": params})
        folder_key = f"{self.prefix}/{area}" if self.prefix else area
        return S3Bucket(bucket_name=self.bucket, credentials=credentials, bucket_folder=folder_key)


def pinned_storage(roots: TrustRoots) -> ReleaseStorage:
    """The storage a trust file pins: its S3 URL (the host's AWS credentials), its
    directory, or the host's state dir."""
    bucket = roots.ledger_bucket()
    if bucket is not None:
        return ReleaseStorage(
            kind="s3", bucket=bucket[0], prefix=bucket[1], endpoint_url=roots.s3_endpoint
        )
    return ReleaseStorage(kind="local", path=roots.ledger or "")


def release_storage(settings: Settings) -> ReleaseStorage:
    """The configured storage: on a host with a trust file, the one it pins; else the
    saved block when ELICE_STORAGE=blocks, else the local default.

    A worker never reads the storage block: whoever rewrites it through the API could
    otherwise plant a ledger of "verified" releases for promotion to ship.

    Raises:
        ConfigError: ELICE_STORAGE=blocks on a host with a trust file, or with no block
            named "elice-release-storage" saved.
    """
    roots = settings.trust_roots()
    if roots is not None:
        if settings.storage_from_blocks:
            msg = (
                "ELICE_STORAGE=blocks on a host with a trust file: the trust file's `ledger` "
                "says where the ledger lives, never a block the API can rewrite"
            )
            raise ConfigError(msg)
        return pinned_storage(roots)
    if settings.storage_from_blocks:
        try:
            loaded = ReleaseStorage.load(STORAGE_BLOCK)
        except ValueError as exc:
            msg = f"ELICE_STORAGE=blocks but block {STORAGE_BLOCK!r} cannot be loaded: {exc}"
            raise ConfigError(msg) from exc
        if not isinstance(loaded, ReleaseStorage):  # pragma: no cover - Block.load's typing
            msg = f"block {STORAGE_BLOCK!r} is not a ReleaseStorage"
            raise TypeError(msg)
        return loaded
    return ReleaseStorage()


def ledger_filesystem(settings: Settings) -> WritableFileSystem:
    """Where the release ledger lives (the storage block is loaded: resolve it once a run)."""
    return release_storage(settings).filesystem("ledger", settings.resolved_state_dir())


def backup_filesystem(settings: Settings) -> WritableFileSystem:
    """Where environment backups live (the storage block is loaded: resolve it once a run)."""
    return release_storage(settings).filesystem("backups", settings.resolved_state_dir())


def release_stores(settings: Settings) -> tuple[WritableFileSystem, WritableFileSystem]:
    """(ledger, backups): the storage block loaded once, for a run to pass down."""
    storage = release_storage(settings)
    base = settings.resolved_state_dir()
    return storage.filesystem("ledger", base), storage.filesystem("backups", base)

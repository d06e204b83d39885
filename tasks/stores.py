"""Exclusive-create object stores over the two filesystem blocks: a local disk or S3.

The ledger and the backups write immutable files; creation must be exclusive so two
writers racing for the same name cannot both win (a hard link on a local disk, a
conditional `PutObject` with `If-None-Match: *` on S3).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect_aws import S3Bucket

from core.errors import LedgerError


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
        except OSError as exc:
            msg = f"cannot read {self._path(path)}: {exc.strerror or exc}"
            raise LedgerError(msg) from exc

    def create(self, path: str, data: bytes) -> bool:
        """Write to a temporary file, then hard-link it into place: atomic and exclusive."""
        target = self._path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        except OSError as exc:
            msg = f"cannot write {target}: {exc.strerror or exc}"
            raise LedgerError(msg) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError as exc:  # disk full, permission, read-only file system
            msg = f"cannot write {target}: {exc.strerror or exc}"
            raise LedgerError(msg) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True

    def names(self, folder: str) -> list[str]:
        """Files directly in `folder`, temporary files excluded."""
        directory = self._path(folder)
        try:
            if not directory.is_dir():
                return []
            return sorted(
                p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
            )
        except OSError as exc:
            msg = f"cannot list {directory}: {exc.strerror or exc}"
            raise LedgerError(msg) from exc


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
            raise LedgerError(f"cannot read s3 key {self._key(path)}: {_aws_error(exc)}") from exc
        except BotoCoreError as exc:  # endpoint unreachable, connection reset, read timeout
            raise LedgerError(f"cannot read s3 key {self._key(path)}: {exc}") from exc
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
            raise LedgerError(f"cannot write s3 key {self._key(path)}: {_aws_error(exc)}") from exc
        except BotoCoreError as exc:
            raise LedgerError(f"cannot write s3 key {self._key(path)}: {exc}") from exc
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
            raise LedgerError(f"cannot list s3 prefix {prefix}: {_aws_error(exc)}") from exc
        except BotoCoreError as exc:
            raise LedgerError(f"cannot list s3 prefix {prefix}: {exc}") from exc
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

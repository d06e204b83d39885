"""Exclusive-create object stores over the two filesystem blocks: a local disk or S3.

The ledger and the backups write immutable files; creation must be exclusive so two
writers racing for the same name cannot both win (a hard link on a local disk, a
conditional `PutObject` with `If-None-Match: *` on S3).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect_aws import S3Bucket
from urllib3.exceptions import HTTPError

from core.errors import LedgerError, LedgerUnavailable
from tasks.local_store import LocalStore, ObjectStore

__all__ = ["LocalStore", "ObjectStore", "S3Store", "open_store"]


class S3Store:
    """An S3Bucket block's folder.

    Exclusive creation relies on conditional writes, atomic on S3 (since 2024-08) and MinIO.
    moto (5.2) honours If-None-Match but checks it without a lock: it stops sequential
    conflicts, not truly simultaneous PUTs; the concurrency test runs on local disk.

    The client retries what may pass (connection refused or reset, timeouts, 5xx,
    throttling) in botocore's standard mode, within `CLIENT_CONFIG` unless the block's
    credentials configure their own (`aws_client_parameters.config`: attempts, timeouts);
    what is left is `LedgerUnavailable`, which the ledger's tasks retry again. A refusal
    (403, a missing bucket) is a `LedgerError`, retried by nobody.
    """

    def __init__(self, bucket: S3Bucket) -> None:
        self.bucket = bucket
        self._client: Any = None

    @property
    def client(self) -> Any:
        """One boto3 S3 client per store, with the retry budget and timeouts of `CLIENT_CONFIG`
        where the block sets none."""
        if self._client is None:
            credentials = self.bucket.credentials
            params = credentials.aws_client_parameters
            if params.config is None:
                params = params.model_copy(update={"config": dict(CLIENT_CONFIG)})
                credentials = credentials.model_copy(update={"aws_client_parameters": params})
            self._client = credentials.get_s3_client()
        return self._client

    def _key(self, path: str) -> str:
        return self.bucket._resolve_path(path)  # same keys as write_path

    def _url(self, key: str) -> str:
        """Where a failure happened, bucket and key (never the credentials)."""
        return f"s3://{self.bucket.bucket_name}/{key}"

    def read(self, path: str) -> bytes | None:
        """The object's bytes, None when missing.

        An answer cut inside its headers reaches botocore as a 200 without a length and
        with an empty body, which no retry of the client's sees: read again, up to
        `CUT_READS` times, then `LedgerUnavailable`.
        """
        key = self._key(path)
        for _ in range(CUT_READS):
            try:
                answer = self.client.get_object(Bucket=self.bucket.bucket_name, Key=key)
                body: bytes = answer["Body"].read()  # an answer cut mid-body fails here
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise _failure(f"cannot read {self._url(key)}", exc) from exc
            except (BotoCoreError, OSError, HTTPError) as exc:
                raise _failure(f"cannot read {self._url(key)}", exc) from exc
            if answer.get("ContentLength") == len(body):
                return body
        msg = f"cannot read {self._url(key)}: {CUT_READS} answers cut short"
        raise LedgerUnavailable(msg)

    def create(self, path: str, data: bytes) -> bool:
        """PutObject with If-None-Match: * ; 412 PreconditionFailed means the object exists.

        A write whose answer was lost may still land (S3 finishes what it received): a
        retry of it then meets the object, and `False` here may mean the writer's own
        earlier attempt won. The ledger reads the object back to tell (`Ledger.update`).
        """
        key = self._key(path)
        try:
            self.client.put_object(
                Bucket=self.bucket.bucket_name,
                Key=key,
                Body=data,
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            # 409 ConditionalRequestConflict: a concurrent conditional write is in flight.
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            raise _failure(f"cannot write {self._url(key)}", exc) from exc
        except (BotoCoreError, OSError, HTTPError) as exc:
            raise _failure(f"cannot write {self._url(key)}", exc) from exc
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
        except (ClientError, BotoCoreError, OSError, HTTPError) as exc:
            raise _failure(f"cannot list {self._url(prefix)}", exc) from exc
        return sorted(found)


CUT_READS = 3
"""Reads of an object whose answer came back cut inside its headers, before giving up."""

CLIENT_CONFIG: dict[str, Any] = {
    "retries": {"mode": "standard", "total_max_attempts": 6},
    "connect_timeout": 5,
    "read_timeout": 30,
}
"""The S3 client's budget where the storage's credentials set none: six attempts with
botocore's jittered backoff (up to 20 s apart), each bounded; about half a minute of
outage is waited out before the ledger's tasks see `LedgerUnavailable`."""

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


def _failure(what: str, exc: Exception) -> LedgerError:
    """The project's error for an S3 client failure: `LedgerUnavailable` when it may pass
    (no answer, a cut answer, a timeout, 5xx, throttling), else `LedgerError` (refused)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"{what}: {error.get('Code', '?')}: {error.get('Message', '')}"
        if status >= 500 or status == 429 or error.get("Code") in _TRANSIENT_CODES:
            return LedgerUnavailable(f"{text} (HTTP {status})")
        return LedgerError(f"{text} (HTTP {status})")
    return LedgerUnavailable(f"{what}: {exc}")


def open_store(fs: WritableFileSystem) -> ObjectStore:
    """The exclusive-create store for a filesystem block.

    Raises:
        TypeError: the block is neither a LocalFileSystem nor an S3Bucket.
    """
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs.basepath or ".")
    if isinstance(fs, S3Bucket):
        return S3Store(fs)
    msg = f"{type(fs).__name__} cannot create files exclusively; use LocalFileSystem or S3Bucket"
    raise TypeError(msg)

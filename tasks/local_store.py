"""The ledger's and backups' store on a local disk, and reading the ledger; no Prefect.

`tasks.stores` opens the same store for a run's filesystem block (and S3 beside it);
the read commands (`cicd status`) open it on the state dir's `ledger` directly, so
reading what serves costs no Prefect, boto3 or cloud import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from core.errors import LedgerError
from core.ledger import (
    EnvironmentState,
    check_environment_name,
    parse_revision,
    revision_numbers,
    revision_path,
)


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
    """A directory: the ledger's or the backups' on a local disk."""

    def __init__(self, basepath: Path | str) -> None:
        self.basepath = Path(basepath).expanduser().resolve()

    def _path(self, path: str) -> Path:
        """`path` under the base directory; a path that leaves it is refused (ValueError),
        as Prefect's LocalFileSystem refuses it."""
        resolved = (self.basepath / Path(path).expanduser()).resolve()
        if self.basepath != resolved and self.basepath not in resolved.parents:
            msg = f"Provided path {resolved} is outside of the base path {self.basepath}."
            raise ValueError(msg)
        return resolved

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


class LedgerReader:
    """The release ledger, read: an environment's revisions in any `ObjectStore`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def _revisions(self, env: str) -> list[int]:
        return revision_numbers(self.store.names(env))

    def _read(self, env: str, revision: int) -> EnvironmentState:
        path = revision_path(env, revision)
        return parse_revision(path, self.store.read(path))

    def current(self, env: str) -> EnvironmentState:
        """The latest revision, or an empty revision 0 when nothing is recorded."""
        check_environment_name(env)
        revisions = self._revisions(env)
        if not revisions:
            return EnvironmentState(environment=env)
        return self._read(env, revisions[-1])

    def revision(self, env: str, number: int) -> EnvironmentState | None:
        """Revision `number` of `env` (None: there is no such revision)."""
        check_environment_name(env)
        return self._read(env, number) if number in self._revisions(env) else None

    def history(self, env: str) -> list[EnvironmentState]:
        """Every revision, oldest first."""
        check_environment_name(env)
        return [self._read(env, number) for number in self._revisions(env)]

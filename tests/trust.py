"""Pin a repository for this process, as a host's trust file does (core/trust.py).

The repository whose protected branch decides (the approval policy, what a worker may
run) is never a block: a test names it the way a host does, with a trust file and
ELICE_TRUST_FILE. `config: null` leaves the configuration to the test (ELICE_CONFIG or
a flow's `config_source`), as on a person's machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.core import Block

from core.trust import TRUST_FILE_ENV, TrustRoots, write_trust_roots

ALL_ENVIRONMENTS = ("dev", "staging", "production")


class SavedRepository(Block):
    """An attacker's block: the type and name (`elice-repository`) the pipeline once read
    its repository from, saved through the API to see that nothing reads it now."""

    _block_type_name = "Elice Git Repository"
    url: str
    name: str = ""
    protected_branch: str = "main"


def trust_file_for(
    folder: Path,
    url: str | Path,
    *,
    name: str = "elice/monorepo",
    environments: tuple[str, ...] = ALL_ENVIRONMENTS,
    config: str | None = None,
    **more: Any,
) -> Path:
    """A trust file in `folder` pinning `url` (for a child process's ELICE_TRUST_FILE);
    `more`: other fields of TrustRoots (ledger, registries, ...)."""
    roots = TrustRoots(
        repository=str(url), name=name, environments=environments, config=config, **more
    )
    return write_trust_roots(folder / "trust.yaml", roots)


def pin_repository(
    monkeypatch: pytest.MonkeyPatch, folder: Path, url: str | Path, **pinned: Any
) -> Path:
    """`trust_file_for(folder, url, **pinned)`, and ELICE_TRUST_FILE pointing at it."""
    path = trust_file_for(folder, url, **pinned)
    monkeypatch.setenv(TRUST_FILE_ENV, str(path))
    return path

"""What the light read commands (`status`, `audit`) share: whether this host can take the
light path, the configuration without Prefect, and the ledger's local directory.

The full path (Prefect's blocks and clients) stays for a host with a trust file (its
configuration from the protected branch, its pinned blocks and ledger) and for
ELICE_STORAGE=blocks (the storage block's nested AWS credentials).
"""

from __future__ import annotations

from pathlib import Path

from cicd.light_api import Api, ApiError, find_api, read_block_data
from cicd.options import fail
from core.catalog import DOCKER_TARGET_BLOCK, DOCKER_TARGET_TYPE
from core.config import (
    CATALOG_BLOCK,
    CATALOG_BLOCK_TYPE,
    ENVIRONMENTS_BLOCK,
    ENVIRONMENTS_BLOCK_TYPE,
    PipelineConfig,
    config_from_blocks,
    default_config_file,
    load_file,
)
from core.errors import ConfigError
from core.settings import Settings
from tasks.local_store import LocalStore


def full_path_needed(settings: Settings) -> bool:
    """The host has a trust file, or its ledger is in the storage block; a trust file that
    cannot be read ends the command (exit 2)."""
    try:
        return settings.trust_roots() is not None or settings.storage_from_blocks
    except ConfigError as exc:
        fail(str(exc))


def _blocks_config(api: Api | None) -> PipelineConfig:
    """The saved configuration blocks, read from `api`.

    Raises:
        ConfigError: no API, a block missing, or invalid data.
        ApiError: the API refused or did not answer.
    """
    advice = "run `cicd register-blocks` first"
    if api is None:
        msg = f"Prefect blocks: no Prefect API (set PREFECT_API_URL or start the stack); {advice}"
        raise ConfigError(msg)
    found = []
    for slug, name in (
        (CATALOG_BLOCK_TYPE, CATALOG_BLOCK),
        (ENVIRONMENTS_BLOCK_TYPE, ENVIRONMENTS_BLOCK),
    ):
        data = read_block_data(api, slug, name)
        if data is None:
            msg = f"Prefect blocks: no block {name!r} of type {slug!r} saved; {advice}"
            raise ConfigError(msg)
        found.append(data)
    return config_from_blocks(
        found[0], found[1], source=f"blocks {CATALOG_BLOCK}, {ENVIRONMENTS_BLOCK}"
    )


def light_config(settings: Settings, source: str | None) -> tuple[PipelineConfig, Api | None]:
    """The configuration `source` (else ELICE_CONFIG, else the embedded default) and, for
    the saved blocks, the API they were read from; exit 2 when it is invalid or missing,
    1 when the API refused."""
    choice = source or settings.config
    api = find_api() if choice == "blocks" else None
    try:
        if choice == "blocks":
            return _blocks_config(api), api
        return load_file(Path(choice) if choice else default_config_file()), None
    except ConfigError as exc:
        fail(str(exc))
    except ApiError as exc:
        fail(str(exc), 1)


def read_docker_target(api: Api | None) -> None:
    """Read the saved docker target from `api` (else the API this host finds), as the
    deploys read it, so that an API refusing the user's string ends the command (exit 1)
    as on the full path; no API, or no target saved, is the default target."""
    api = api or find_api()
    if api is not None:
        try:
            read_block_data(api, DOCKER_TARGET_TYPE, DOCKER_TARGET_BLOCK)
        except ApiError as exc:
            fail(str(exc), 1)


def local_ledger(settings: Settings) -> LocalStore:
    """The ledger's directory on this host (the default storage: `<state dir>/ledger`)."""
    return LocalStore(settings.resolved_state_dir() / "ledger")

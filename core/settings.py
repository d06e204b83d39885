"""The user settings: every environment variable the pipeline reads as a user input.

Read once, by `Settings.from_environ()`: by the command line, or at a flow's start when a
worker runs it. Below that, the values are passed in; nothing under the flows reads
`os.environ` for them. The README lists them as the user settings.

| variable | field | what |
|---|---|---|
| `ELICE_CONFIG` | `config` | the configuration: a YAML file, `blocks`, or the embedded default |
| `ELICE_REPO` | `repo` | the monorepo CI checks (default: this checkout) |
| `ELICE_STATE_DIR` | `state_dir` | where state lives (default: `<checkout>/.elice`) |
| `ELICE_STACK_DIR` | `stack_dir` | where the local stack lives (default: the state dir) |
| `ELICE_STORAGE` | `storage` | `blocks`: the ledger and backups in the saved storage block |
| `ELICE_DEPLOY_WAVE` | `deploy_wave` | services deployed at once (default: the machine's cores) |
| `ELICE_LOCK_RENEW_S` | `lock_renew_s` | seconds between a deploy lock's renewals (default 10) |
| `DOCKER_HOST` | `docker_host` | a real Docker engine instead of the stack's |
| `ELICE_TRUST_FILE` | `trust_file` | a worker host's trust roots (`core/trust.py`) |
| `ELICE_CLOCK` | `clock` | the instant deploy windows are judged at (not on a worker) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ConfigError
from core.trust import TRUST_FILE_ENV, TrustRoots, load_trust_roots

CHECKOUT = Path(__file__).resolve().parents[1]
"""This checkout: the default monorepo and the parent of the default state dir."""

VARIABLES: dict[str, str] = {
    "config": "ELICE_CONFIG",
    "repo": "ELICE_REPO",
    "state_dir": "ELICE_STATE_DIR",
    "stack_dir": "ELICE_STACK_DIR",
    "storage": "ELICE_STORAGE",
    "deploy_wave": "ELICE_DEPLOY_WAVE",
    "lock_renew_s": "ELICE_LOCK_RENEW_S",
    "docker_host": "DOCKER_HOST",
    "trust_file": TRUST_FILE_ENV,
    "clock": "ELICE_CLOCK",
}
"""Each setting and the environment variable it is read from."""


class Settings(BaseModel):
    """The user settings, as read from the environment once. Unset and empty are the same."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: str = Field(default="", description="ELICE_CONFIG: a file, `blocks`, or the default")
    repo: Path = Field(default=CHECKOUT, description="ELICE_REPO: the monorepo CI checks")
    state_dir: Path = Field(default=CHECKOUT / ".elice", description="ELICE_STATE_DIR")
    stack_dir: Path | None = Field(
        default=None, description="ELICE_STACK_DIR (None: the state dir)"
    )
    storage: str = Field(default="", description="ELICE_STORAGE: `blocks` or unset")
    deploy_wave: str = Field(
        default="",
        description="ELICE_DEPLOY_WAVE as given; checked where the waves are sized",
    )
    lock_renew_s: float = Field(
        default=10.0,
        gt=0,
        le=30,
        description="ELICE_LOCK_RENEW_S: seconds between renewals of a deploy lock's 60 s lease",
    )
    docker_host: str | None = Field(default=None, description="DOCKER_HOST")
    trust_file: Path | None = Field(default=None, description="ELICE_TRUST_FILE")
    clock: str = Field(
        default="", description="ELICE_CLOCK: ISO 8601 instant for deploy windows (unset: now)"
    )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings from `environ` (default: this process's environment)."""
        source = os.environ if environ is None else environ
        given = {field: source.get(name, "") for field, name in VARIABLES.items()}
        try:
            return cls(**{field: value for field, value in given.items() if value})
        except ValidationError as exc:
            problems = [
                f"{VARIABLES.get(str(e['loc'][0]), e['loc'][0])}={given.get(str(e['loc'][0]))!r}: "
                f"{e['msg']}"
                for e in exc.errors()
            ]
            raise ConfigError("; ".join(problems)) from None

    def trust_roots(self) -> TrustRoots | None:
        """This host's trust roots (the ELICE_TRUST_FILE a worker sets), None without one.

        Raises:
            ConfigError: the file is missing, writable by others, or invalid.
        """
        return load_trust_roots(self.trust_file) if self.trust_file is not None else None

    @property
    def storage_from_blocks(self) -> bool:
        """Whether the ledger and backups live where the saved storage block says."""
        return self.storage == "blocks"

    def resolved_state_dir(self) -> Path:
        """The state dir, created when missing."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self.state_dir

    def resolved_stack_dir(self) -> Path:
        """The stack's home (the state dir unless ELICE_STACK_DIR names one), created."""
        path = self.stack_dir or self.state_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

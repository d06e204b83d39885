"""The trust roots of a worker host: what decides what ships, pinned where the API can't reach.

Open-source Prefect has no users and no per-route permissions: whoever reaches its API can
edit blocks, deployments, parameters, variables and job variables. So nothing the server
stores may decide what ships. A worker host pins, in a file of its own (owner-only):

- the repository (clone URL, protected branch, the file holding its read token), from
  whose protected branch, as committed, everything else that decides is read: the
  approval policy and its keys, the environments with their targets and registries, the
  service catalog, and `prefect.yaml` (what the worker may run);
- the environments this worker may deploy into (a CI or staging worker never holds
  production's credentials, and refuses a run that would deploy there);
- where the release ledger and backups live (`ledger`: a local directory or an S3 URL,
  with the host's own AWS credentials), never the storage block;
- the address of each registry block a run may use (`registries`): a block names the
  login, the trust file names the host it may be used for, so a rewritten block can
  break a run, never send an image elsewhere;
- the content of each deploy-target block a run may use (`blocks`: its sha256): the
  engine or cluster, its credentials, its manifests directory and extra variables.

The worker hands the file's path to every flow run it starts as `TRUST_FILE_ENV`, after
the deployment's job variables are applied, so no job variable can replace it.

The bottom layer: imports nothing of the project.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ConfigError

TRUST_FILE_ENV = "ELICE_TRUST_FILE"
"""The variable a worker sets for its flow runs: the path of its trust file."""

_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_ENVIRONMENT = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
_CONFIG_PATH = re.compile(r"^(?!/)(?!.*(^|/)\.\.(/|$))[A-Za-z0-9._/-]{1,200}\.ya?ml$")
_S3 = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[^/].*?))?/?$")


class TrustRoots(BaseModel):
    """What a worker host trusts, from its own file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repository: str = Field(description="clone URL (https://, ssh://, file://) or a local path")
    protected_branch: str = Field(default="main", description="only its commits ship")
    token_file: Path | None = Field(
        default=None, description="a file holding the https read token (owner-only)"
    )
    environments: tuple[str, ...] = Field(
        description="the environments this worker may deploy into (its credentials)"
    )
    name: str = Field(
        default="", description="owner/name as GitHub spells it; a run naming another is refused"
    )
    config: str | None = Field(
        default="config/pipeline.yaml",
        description="the configuration file, a path in the repository read from the branch "
        "(None: the host's choice, ELICE_CONFIG or --config: a person's machine; a worker "
        "refuses to start without one)",
    )
    ledger: str | None = Field(
        default=None,
        description="ledger and backups: an absolute directory or s3://bucket/prefix "
        "(None: the host's state dir)",
    )
    s3_endpoint: str | None = Field(
        default=None, description="endpoint of an S3-compatible store for `ledger`"
    )
    registries: dict[str, str] = Field(
        default_factory=dict,
        description="registry block name -> the registry host (host[:port]) it may log into",
    )
    blocks: dict[str, str] = Field(
        default_factory=dict,
        description="deploy-target block name -> sha256:<digest> of its whole content "
        "(`python -m stack.trusted_worker block-digest NAME`)",
    )

    @field_validator("protected_branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        if not _BRANCH.match(value) or ".." in value:
            msg = f"{value!r} is not a branch name"
            raise ValueError(msg)
        return value

    @field_validator("environments")
    @classmethod
    def _environments(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in value if not _ENVIRONMENT.match(name)]
        if bad or not value:
            msg = f"environments must be environment names, got {list(value)}"
            raise ValueError(msg)
        return value

    @field_validator("config")
    @classmethod
    def _config(cls, value: str | None) -> str | None:
        if value is not None and not _CONFIG_PATH.match(value):
            msg = f"config must be a relative path to a .yaml file in the repository, got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, value: str | None) -> str | None:
        if value is not None and not (_S3.match(value) or value.startswith("/")):
            msg = f"ledger must be an absolute directory or s3://bucket/prefix, got {value!r}"
            raise ValueError(msg)
        return value

    def ledger_bucket(self) -> tuple[str, str] | None:
        """(bucket, prefix) when the ledger lives in S3, else None."""
        found = _S3.match(self.ledger or "")
        if found is None:
            return None
        return found["bucket"], (found["prefix"] or "").strip("/")

    def check_registry(self, block: str, address: str) -> None:
        """Refuse a registry block whose address is not the one this host pins for it.

        Raises:
            ConfigError: `block` is not pinned, or pinned to another address.
        """
        pinned = self.registries.get(block)
        if pinned is None:
            msg = (
                f"registry block {block!r} is not pinned in the trust file: a block saved "
                "through the API cannot choose where images go"
            )
            raise ConfigError(msg)
        if pinned != address:
            msg = f"registry block {block!r} names {address!r}; the trust file pins {pinned!r}"
            raise ConfigError(msg)

    def check_block(self, block: str, digest: str) -> None:
        """Refuse a saved deploy-target block whose content is not the one this host pins.

        Raises:
            ConfigError: `block` is not pinned, or its content changed since it was pinned.
        """
        pinned = self.blocks.get(block)
        if pinned is None:
            msg = (
                f"block {block!r} is not pinned in the trust file (blocks): a block saved "
                "through the API cannot choose where or how services deploy"
            )
            raise ConfigError(msg)
        if pinned != digest:
            msg = (
                f"block {block!r} changed since the trust file pinned it "
                f"({digest[:19]} is not {pinned[:19]})"
            )
            raise ConfigError(msg)

    def may_deploy(self, environment: str) -> bool:
        """Whether this worker holds `environment`'s deploy credentials."""
        return environment in self.environments


def load_trust_roots(path: Path) -> TrustRoots:
    """The trust roots in `path` (YAML), refusing a file others may write.

    Raises:
        ConfigError: the file is missing, writable by group or others, or invalid.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"trust file {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        msg = f"trust file {path} is writable by others (mode {stat.S_IMODE(mode):o}): chmod 600"
        raise ConfigError(msg)
    try:
        data = yaml.safe_load(text)
        return TrustRoots.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        msg = f"trust file {path} is invalid: {exc}"
        raise ConfigError(msg) from exc


def write_trust_roots(path: Path, roots: TrustRoots) -> Path:
    """Write `roots` to `path`, owner-only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(roots.model_dump(mode="json"), sort_keys=False), "utf-8")
    return path

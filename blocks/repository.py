"""The repository CI checks and whose protected branch decides what ships: pinned, never saved.

    pinned_repository(settings)   the trust file's repository, else this machine's checkout

Open-source Prefect lets whoever reaches its API save any block, so the repository is
not a block: a worker reads it from its host's trust file (core/trust.py), a command on
a person's machine from ELICE_REPO (default: this checkout) with `main` protected.
Everything that decides what ships is read from that repository's protected branch.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from core.errors import ConfigError
from core.settings import Settings
from core.trust import TrustRoots

_BRANCH = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/-]{1,200}(?<![/.])$")
LOCAL_PROTECTED_BRANCH = "main"
"""The protected branch of a machine without a trust file."""


class GitRepository(BaseModel):
    """The monorepo CI checks out, one exact commit per run."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="Clone URL (https://, ssh://, file://) or a local path")
    name: str = Field(
        default="",
        description="owner/name as GitHub spells it; a run naming another repository is refused",
    )
    protected_branch: str = Field(
        default="main", description="Only commits on this branch deploy and become releases"
    )
    username: str | None = Field(
        default=None, description="https: user name (x-access-token for a GitHub token)"
    )
    token: SecretStr | None = Field(default=None, description="https: password or token")

    @field_validator("protected_branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        if not _BRANCH.match(value):
            msg = f"protected_branch {value!r} is not a branch name"
            raise ValueError(msg)
        return value

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        if re.match(r"^[a-z+]+://[^/@]+:[^/@]*@", value):
            msg = "url must not carry credentials: put the token in `token`"
            raise ValueError(msg)
        return value

    @property
    def label(self) -> str:
        """How records name the repository: its GitHub name, else its URL."""
        return self.name or self.url

    @property
    def protected_ref(self) -> str:
        """The full ref of the protected branch."""
        return f"refs/heads/{self.protected_branch}"


def trusted_repository(roots: TrustRoots) -> GitRepository:
    """The repository `roots` pin, its read token from its owner-only file.

    Raises:
        ConfigError: the token file cannot be read.
    """
    token: SecretStr | None = None
    if roots.token_file is not None:
        try:
            token = SecretStr(roots.token_file.read_text(encoding="utf-8").strip())
        except OSError as exc:
            msg = f"token file {roots.token_file}: {exc.strerror or exc}"
            raise ConfigError(msg) from exc
    return GitRepository(
        url=roots.repository, name=roots.name, protected_branch=roots.protected_branch, token=token
    )


def pinned_repository(settings: Settings) -> GitRepository:
    """The repository this host trusts: its trust file's, else ELICE_REPO with `main`.

    Never a block, a variable or a parameter: nothing the Prefect API stores.

    Raises:
        ConfigError: the trust file or its token file cannot be read.
    """
    roots = settings.trust_roots()
    if roots is not None:
        return trusted_repository(roots)
    return GitRepository(url=str(settings.repo), protected_branch=LOCAL_PROTECTED_BRANCH)

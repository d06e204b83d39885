"""The repository CI checks: where to fetch it, its protected branch, its credentials."""

from __future__ import annotations

import re
from typing import cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from blocks.config import repo_root

REPOSITORY_BLOCK = "elice-repository"
_BRANCH = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/-]{1,200}(?<![/.])$")


class GitRepository(Block):
    """The monorepo CI checks out, one exact commit per run."""

    _block_type_name = "Elice Git Repository"
    _description = "The monorepo: clone URL, protected branch, credentials for https."

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


def load_repository() -> GitRepository:
    """The saved `elice-repository` block, else this checkout with `main` protected."""
    try:
        return cast("GitRepository", GitRepository.load(REPOSITORY_BLOCK))
    except ValueError:  # none saved: the embedded default is this checkout
        return GitRepository(url=str(repo_root()))

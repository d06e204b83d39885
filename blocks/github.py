"""The GitHub repository the pipeline reports to: its API, its name, the token it acts with.

    load_github(name)   the saved `GitHubRepository` block, None when none is saved

Saved as the block `elice-github`: with it, CI runs set commit statuses and a pull
request summary, and deploys create GitHub deployments; without it nothing talks to
GitHub. The API URL and the token live in one block on purpose: a token kept in a
separate Secret block would follow whatever URL the other block is changed to, so
whoever can save blocks could send the token to a server of their own.
"""

from __future__ import annotations

import re

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator

GITHUB_BLOCK = "elice-github"

_REPOSITORY = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")
_BRANCH = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/-]{1,200}(?<![/.])$")


class GitHubRepository(Block):
    """A GitHub (or GitHub Enterprise Server) repository and a token for its REST API."""

    # Validation errors must not echo the raw input: it holds the token.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "Elice GitHub Repository"
    _description = "Where CI statuses and deployments are reported: repository, API URL, token."

    repository: str = Field(description="owner/name as GitHub spells it, e.g. elice/monorepo")
    token: SecretStr = Field(
        description="A fine-grained token: commit statuses, deployments, pull requests (write)"
    )
    api_url: str = Field(
        default="https://api.github.com",
        description="The REST API root: https://HOST/api/v3 for GitHub Enterprise Server",
    )
    protected_branch: str = Field(
        default="main", description="The branch `cicd github setup` protects"
    )
    required_approvals: int = Field(
        default=1, ge=1, le=6, description="Approving reviews a pull request needs to merge"
    )
    environment_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Environment name -> the URL GitHub links its deployments to",
    )
    retry_backoff_s: float = Field(
        default=2.0, gt=0, le=60, description="First wait before retrying a failed call"
    )
    max_wait_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest wait for a rate limit to reset; a longer one gives up",
    )

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        if not _REPOSITORY.match(value):
            msg = f"repository must be owner/name, got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            msg = "token is empty"
            raise ValueError(msg)
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            msg = f"api_url must be an http(s) URL, got {value!r}"
            raise ValueError(msg)
        return value.rstrip("/")

    @field_validator("protected_branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        if not _BRANCH.match(value):
            msg = f"protected_branch {value!r} is not a branch name"
            raise ValueError(msg)
        return value

    @property
    def owner(self) -> str:
        """The repository's owner."""
        return self.repository.split("/", 1)[0]

    @property
    def name(self) -> str:
        """The repository's name without its owner."""
        return self.repository.split("/", 1)[1]

    def secrets(self) -> list[str]:
        """The secret values, for scrubbing them out of messages."""
        return [self.token.get_secret_value()]


def load_github(name: str = GITHUB_BLOCK) -> GitHubRepository | None:
    """The saved GitHub repository, None when no block of that name is saved (not configured)."""
    try:
        block = GitHubRepository.load(name)
    except ValueError:
        return None
    return block if isinstance(block, GitHubRepository) else None

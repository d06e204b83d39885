"""Deploys as GitHub sees them: a deployment per deploy into an environment, and its statuses.

    start_deployment(gh, repo, ...)     a deployment of a commit, status in_progress
    finish_deployment(gh, repo, ...)    success (the one it replaced: inactive) or failure
    latest_active(gh, repo, env)        the environment's deployment whose last status is success

Deployments are created with `required_contexts: []` and `auto_merge: false`: the
pipeline has already decided (CI's checks, the promotion's gate); GitHub's own checks
would refuse a deploy the pipeline made, and GitHub would merge the default branch into
the ref. `auto_inactive` is off: the deployment a success replaces is marked inactive by
name here, with the reason, rather than by GitHub's own rule.
"""

from __future__ import annotations

from typing import Any, Literal

from githubkit import GitHub
from githubkit.utils import UNSET

from blocks.github import GitHubRepository
from tasks.github.client import call

FinalState = Literal["success", "failure", "error", "inactive"]
RECENT = 20
"""How many of an environment's latest deployments are looked at for the active one."""


def start_deployment(
    gh: GitHub[Any],
    repo: GitHubRepository,
    *,
    environment: str,
    sha: str,
    task: str,
    description: str,
    payload: dict[str, Any],
    log_url: str | None,
    state: Literal["in_progress", "failure"] = "in_progress",
) -> int:
    """A deployment of `sha` into `environment`, in progress (or, for a release refused
    before it deployed, failed at once); returns its id.

    Raises:
        GitHubRefused / GitHubUnavailable: GitHub refused or could not be reached.
    """
    created = call(
        f"deployment to {environment}",
        gh.rest.repos.create_deployment,
        repo.owner,
        repo.name,
        ref=sha,
        task=task,
        environment=environment,
        description=description[:140],
        payload=payload,
        auto_merge=False,
        required_contexts=[],
        production_environment=environment == "production",
        transient_environment=False,
    )
    deployment_id = int(created["id"])
    set_state(gh, repo, deployment_id, state, description, log_url, environment)
    return deployment_id


def set_state(
    gh: GitHub[Any],
    repo: GitHubRepository,
    deployment_id: int,
    state: Literal["in_progress", "success", "failure", "error", "inactive"],
    description: str,
    log_url: str | None,
    environment: str,
) -> None:
    """A new status of deployment `deployment_id` (GitHub keeps 140 characters of text)."""
    url = repo.environment_urls.get(environment)
    call(
        f"deployment {deployment_id} status",
        gh.rest.repos.create_deployment_status,
        repo.owner,
        repo.name,
        deployment_id,
        state=state,
        description=" ".join(description.split())[:140],
        auto_inactive=False,
        log_url=log_url or UNSET,
        environment_url=url or UNSET,
    )


def _last_state(gh: GitHub[Any], repo: GitHubRepository, deployment_id: int) -> str | None:
    statuses = call(
        f"deployment {deployment_id} statuses",
        gh.rest.repos.list_deployment_statuses,
        repo.owner,
        repo.name,
        deployment_id,
        per_page=1,
    )
    return str(statuses[0]["state"]) if statuses else None


def was_successful(gh: GitHub[Any], repo: GitHubRepository, deployment_id: int) -> bool:
    """Whether deployment `deployment_id` ever reached success (it served at some time)."""
    statuses = call(
        f"deployment {deployment_id} statuses",
        gh.rest.repos.list_deployment_statuses,
        repo.owner,
        repo.name,
        deployment_id,
        per_page=100,
    )
    return any(s["state"] == "success" for s in statuses or [])


def recent_deployments(
    gh: GitHub[Any], repo: GitHubRepository, environment: str
) -> list[dict[str, Any]]:
    """The environment's latest deployments, newest first (one page)."""
    found = call(
        f"deployments of {environment}",
        gh.rest.repos.list_deployments,
        repo.owner,
        repo.name,
        environment=environment,
        per_page=RECENT,
    )
    return list(found or [])


def latest_active(
    gh: GitHub[Any], repo: GitHubRepository, environment: str, *, besides: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The newest deployment of `environment` (other than `besides`) whose last status is
    success, and the deployments older than it (newest first); None without one."""
    recent = [d for d in recent_deployments(gh, repo, environment) if d["id"] != besides]
    for index, deployment in enumerate(recent):
        if _last_state(gh, repo, int(deployment["id"])) == "success":
            return deployment, recent[index + 1 :]
    return None


def finish_deployment(
    gh: GitHub[Any],
    repo: GitHubRepository,
    deployment_id: int,
    environment: str,
    *,
    ok: bool,
    description: str,
    log_url: str | None,
) -> None:
    """Success (and the deployment it replaces inactive) or failure (the old one stays).

    Raises:
        GitHubRefused / GitHubUnavailable: GitHub refused or could not be reached.
    """
    if not ok:
        set_state(gh, repo, deployment_id, "failure", description, log_url, environment)
        return
    replaced = latest_active(gh, repo, environment, besides=deployment_id)
    set_state(gh, repo, deployment_id, "success", description, log_url, environment)
    if replaced is not None:
        old = int(replaced[0]["id"])
        text = f"replaced by deployment {deployment_id}"
        set_state(gh, repo, old, "inactive", text, log_url, environment)

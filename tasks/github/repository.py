"""A GitHub repository set up for the pipeline: protection, environments, Actions secrets.

    plan_setup(gh, repo, secrets, record)   what differs from the wanted state, as steps
    apply_setup(gh, repo, steps, secrets, record)   make it so, one call per step

The wanted state (the seed's setup-github-integration.sh):
- the protected branch: the CI contexts `REQUIRED_CONTEXTS` required (others a team added
  are kept), pull requests with at least the block's approving reviews (stale ones
  dismissed), admins included, no force-push, no deletion;
- the environments staging and production, deployable from protected branches only;
- the Actions secrets the workflow reads, each sealed (libsodium's sealed box, PyNaCl) to
  the public key GitHub gives for it, as GitHub requires: the Prefect API URL and its auth
  string the repository's (every job needs them), the promotion key each environment's.

GitHub never gives a secret back, so whether one changed is judged by a record kept
beside the state (`SecretRecord`): the SHA-256 of the value last sent and GitHub's
`updated_at` after it. A secret someone changed on GitHub since (another `updated_at`),
or one this machine never sent, is sent again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from githubkit import GitHub
from nacl.public import PublicKey, SealedBox

from blocks.github import GitHubRepository
from core.errors import ConfigError
from tasks.github.client import GitHubRefused, call, collect
from tasks.github.statuses import REQUIRED_CONTEXTS

ENVIRONMENTS = ("staging", "production")

Action = Literal["create", "update"]


@dataclass(frozen=True)
class SetupStep:
    """One change to make: what, its name, create or update, and what differs."""

    kind: Literal["branch protection", "environment", "secret"]
    name: str
    action: Action
    detail: str


class SecretRecord:
    """What this machine last sent as each secret of one repository (owner-only file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, str]] = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            self.entries = {}
        except (OSError, ValueError) as exc:
            msg = f"{path}: unreadable record of the secrets sent: {exc}"
            raise ConfigError(msg) from exc

    @staticmethod
    def digest(value: str) -> str:
        """The value's SHA-256 (hex)."""
        return hashlib.sha256(value.encode()).hexdigest()

    def unchanged(self, name: str, value: str, updated_at: str) -> bool:
        """Whether GitHub holds what was last sent as `name` and that is `value`."""
        entry = self.entries.get(name)
        return (
            entry is not None
            and entry.get("digest") == self.digest(value)
            and entry.get("updated_at") == updated_at
        )

    def sent(self, name: str, value: str, updated_at: str) -> None:
        """Remember that `value` was sent as `name`; written at once, mode 0600."""
        self.entries[name] = {"digest": self.digest(value), "updated_at": updated_at}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(self.entries, out, indent=2, sort_keys=True)


def secret_record(state_dir: Path, repo: GitHubRepository) -> SecretRecord:
    """The record of the secrets sent to `repo` from this machine."""
    return SecretRecord(state_dir / "github" / f"{repo.owner}__{repo.name}.secrets.json")


def seal(public_key: str, value: str) -> str:
    """`value` in a sealed box to the repository's base64 public key, base64 (GitHub's form)."""
    box = SealedBox(PublicKey(base64.b64decode(public_key)))
    return base64.b64encode(box.encrypt(value.encode())).decode()


def _enabled(view: dict[str, Any], key: str) -> bool:
    return bool((view.get(key) or {}).get("enabled"))


def _protection_now(view: dict[str, Any] | None) -> dict[str, Any]:
    view = view or {}
    checks = view.get("required_status_checks") or {}
    reviews = view.get("required_pull_request_reviews") or {}
    return {
        "required checks": sorted(checks.get("contexts") or []),
        "up to date before merging": bool(checks.get("strict")),
        "approving reviews": int(reviews.get("required_approving_review_count") or 0),
        "stale reviews dismissed": bool(reviews.get("dismiss_stale_reviews")),
        "admins included": _enabled(view, "enforce_admins"),
        "force pushes": _enabled(view, "allow_force_pushes"),
        "deletions": _enabled(view, "allow_deletions"),
    }


def _protection_wanted(now: dict[str, Any], repo: GitHubRepository) -> dict[str, Any]:
    """The wanted protection, keeping what a team added: more checks, more reviews."""
    return {
        "required checks": sorted({*now["required checks"], *REQUIRED_CONTEXTS}),
        "up to date before merging": True,
        "approving reviews": max(now["approving reviews"], repo.required_approvals),
        "stale reviews dismissed": True,
        "admins included": True,
        "force pushes": False,
        "deletions": False,
    }


def _protection(gh: GitHub[Any], repo: GitHubRepository) -> dict[str, Any] | None:
    try:
        view = call(
            "branch protection",
            gh.rest.repos.get_branch_protection,
            repo.owner,
            repo.name,
            repo.protected_branch,
        )
    except GitHubRefused as exc:
        if exc.status == 404 and "not protected" in str(exc):
            return None
        raise
    return view if isinstance(view, dict) else None


def _plan_protection(gh: GitHub[Any], repo: GitHubRepository) -> list[SetupStep]:
    view = _protection(gh, repo)
    now = _protection_now(view)
    wanted = _protection_wanted(now, repo)
    if view is None:
        detail = (
            f"require {', '.join(wanted['required checks'])}; "
            f"{wanted['approving reviews']} approving review(s); no force-push, no deletion"
        )
        return [SetupStep("branch protection", repo.protected_branch, "create", detail)]
    differ = [f"{key}: {now[key]} -> {wanted[key]}" for key in wanted if now[key] != wanted[key]]
    if not differ:
        return []
    return [SetupStep("branch protection", repo.protected_branch, "update", "; ".join(differ))]


_BRANCH_POLICY = {"protected_branches": True, "custom_branch_policies": False}


def _environments(gh: GitHub[Any], repo: GitHubRepository) -> dict[str, dict[str, Any]]:
    found = collect(
        gh,
        "environments",
        gh.rest.repos.get_all_environments,
        "environments",
        owner=repo.owner,
        repo=repo.name,
    )
    return {env["name"]: env for env in found}


def _plan_environments(existing: dict[str, dict[str, Any]]) -> list[SetupStep]:
    steps = []
    for name in ENVIRONMENTS:
        if name not in existing:
            steps.append(SetupStep("environment", name, "create", "protected branches only"))
        elif existing[name].get("deployment_branch_policy") != _BRANCH_POLICY:
            steps.append(
                SetupStep("environment", name, "update", "deployable from protected branches only")
            )
    return steps


def wanted_secrets(
    prefect_api_url: str | None, auth_string: str | None, promote_key: str | None
) -> dict[str, str]:
    """The secrets to send, by key: `NAME` for the repository's, `env/NAME` for an
    environment's. Those without a value are left out (left as they are on GitHub).

    The Prefect API and its auth string are the repository's: every job needs them, pull
    requests' included. The promotion key is each environment's own: only a job of that
    environment, on a protected branch, can read it.
    """
    wanted = {"PREFECT_API_URL": prefect_api_url, "PREFECT_API_AUTH_STRING": auth_string}
    for env in ENVIRONMENTS:
        wanted[f"{env}/ELICE_PROMOTE_KEY"] = promote_key
    return {key: value for key, value in wanted.items() if value}


def _scope(key: str) -> tuple[str | None, str]:
    """(environment or None, secret name) of a secret's key."""
    env, _, name = key.rpartition("/")
    return env or None, name


def _held(gh: GitHub[Any], repo: GitHubRepository, env: str | None) -> dict[str, dict[str, Any]]:
    if env is None:
        found = collect(
            gh,
            "secrets",
            gh.rest.actions.list_repo_secrets,
            "secrets",
            owner=repo.owner,
            repo=repo.name,
        )
    else:
        found = collect(
            gh,
            f"secrets of {env}",
            gh.rest.actions.list_environment_secrets,
            "secrets",
            owner=repo.owner,
            repo=repo.name,
            environment_name=env,
        )
    return {secret["name"]: secret for secret in found}


def _plan_secrets(
    gh: GitHub[Any],
    repo: GitHubRepository,
    secrets: dict[str, str],
    record: SecretRecord,
    environments: dict[str, dict[str, Any]],
) -> list[SetupStep]:
    held: dict[str | None, dict[str, dict[str, Any]]] = {}
    steps = []
    for key, value in secrets.items():
        env, name = _scope(key)
        if env not in held:  # an environment not created yet holds nothing
            held[env] = _held(gh, repo, env) if env is None or env in environments else {}
        where = f"environment {env}'s key" if env else "the repository's key"
        if name not in held[env]:
            steps.append(SetupStep("secret", key, "create", f"sealed to {where}"))
        elif not record.unchanged(key, value, str(held[env][name].get("updated_at"))):
            steps.append(
                SetupStep("secret", key, "update", "changed, or not sent from this machine")
            )
    return steps


def plan_setup(
    gh: GitHub[Any], repo: GitHubRepository, secrets: dict[str, str], record: SecretRecord
) -> list[SetupStep]:
    """Every step between the repository's state and the wanted one; [] when none.

    `secrets` as `wanted_secrets` returns them.

    Raises:
        GitHubRefused / GitHubUnavailable: a read failed (no permission, GitHub down).
    """
    environments = _environments(gh, repo)
    return [
        *_plan_protection(gh, repo),
        *_plan_environments(environments),
        *_plan_secrets(gh, repo, secrets, record, environments),
    ]


def _put_secret(
    gh: GitHub[Any], repo: GitHubRepository, key: str, value: str, record: SecretRecord
) -> None:
    env, name = _scope(key)
    owner, repo_name = repo.owner, repo.name
    if env is None:
        public = call("public key", gh.rest.actions.get_repo_public_key, owner, repo_name)
        sealed = seal(public["key"], value)
        call(
            f"secret {key}",
            gh.rest.actions.create_or_update_repo_secret,
            owner,
            repo_name,
            name,
            encrypted_value=sealed,
            key_id=public["key_id"],
        )
        sent = call(f"secret {key}", gh.rest.actions.get_repo_secret, owner, repo_name, name)
    else:
        public = call(
            f"public key of {env}",
            gh.rest.actions.get_environment_public_key,
            owner,
            repo_name,
            env,
        )
        sealed = seal(public["key"], value)
        call(
            f"secret {key}",
            gh.rest.actions.create_or_update_environment_secret,
            owner,
            repo_name,
            env,
            name,
            encrypted_value=sealed,
            key_id=public["key_id"],
        )
        sent = call(
            f"secret {key}", gh.rest.actions.get_environment_secret, owner, repo_name, env, name
        )
    record.sent(key, value, str(sent.get("updated_at")))


def apply_step(
    gh: GitHub[Any],
    repo: GitHubRepository,
    step: SetupStep,
    secrets: dict[str, str],
    record: SecretRecord,
) -> None:
    """Make one planned step so.

    Raises:
        GitHubRefused / GitHubUnavailable: GitHub refused or could not be reached.
    """
    if step.kind == "branch protection":
        wanted = _protection_wanted(_protection_now(_protection(gh, repo)), repo)
        call(
            "branch protection",
            lambda: gh.rest.repos.update_branch_protection(
                repo.owner,
                repo.name,
                repo.protected_branch,
                required_status_checks={"strict": True, "contexts": wanted["required checks"]},
                enforce_admins=True,
                required_pull_request_reviews={
                    "dismiss_stale_reviews": True,
                    "required_approving_review_count": wanted["approving reviews"],
                },
                restrictions=None,
                allow_force_pushes=False,
                allow_deletions=False,
            ),
        )
    elif step.kind == "environment":
        call(
            f"environment {step.name}",
            lambda: gh.rest.repos.create_or_update_environment(
                repo.owner,
                repo.name,
                step.name,
                deployment_branch_policy={
                    "protected_branches": True,
                    "custom_branch_policies": False,
                },
            ),
        )
    else:
        _put_secret(gh, repo, step.name, secrets[step.name], record)

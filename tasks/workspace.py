"""The commit under test: a mirror of the repository, and a worktree of one exact commit per run.

Every CI run fetches the repository into a mirror shared by all runs on this machine
(incrementally, under a file lock), then adds a detached worktree at exactly the
commit it was given. Stages run in that worktree, so concurrent runs never share a
working tree or a service's virtual environment; content-keyed caches (uv's cache,
stage results keyed by fingerprint) stay shared. The worktree is removed afterwards.

A commit may ship (deploy to dev, enter the ledger) only when it is on the protected
branch as the mirror sees it after the fetch: ancestry decides, not a ref a caller names.
The same question is asked again, against a fresh fetch, when a release is recorded and
when it is promoted (`unreviewed_commits`, `verify_reviewed`): a commit force-pushed away
in between, or a ledger record naming a commit nobody reviewed, is refused by its SHA.
A local checkout is judged the same way, against the pinned repository's mirror, never
against its own branches.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.config import state_dir
from blocks.repository import GitRepository
from core.errors import ConfigError, SourceError, ToolError, UnreviewedCommit
from core.records import Workspace
from tasks.masking import mask
from tasks.process import STAGE_RETRY_OPTIONS, ToolRun, run_logger, run_tool, which
from tasks.source import scratch_root

FETCH_TIMEOUT_S = 600
GIT_TIMEOUT_S = 120
_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_env(repository: GitRepository) -> dict[str, str]:
    """Variables for git: no prompts, and the https credentials as a header (never in argv)."""
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false"}
    if repository.token is not None:
        user = repository.username or "x-access-token"
        pair = f"{user}:{repository.token.get_secret_value()}".encode()
        mask(repository.token.get_secret_value(), base64.b64encode(pair).decode())
        env |= {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {base64.b64encode(pair).decode()}",
        }
    return env


def _git(
    cwd: Path | None,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = GIT_TIMEOUT_S,
) -> ToolRun:
    where = ["-C", str(cwd)] if cwd is not None else []
    return run_tool([which("git"), *where, *args], env=env, timeout=timeout)


def _must(run: ToolRun, what: str) -> str:
    if not run.ok:
        msg = f"{what} failed: {run.excerpt(5)}"
        raise ToolError(msg)
    return run.output.strip()


def mirror_path(repository: GitRepository) -> Path:
    """Where the mirror of `repository` lives under the state dir."""
    key = hashlib.sha256(repository.url.encode()).hexdigest()[:16]
    return state_dir() / "git" / "mirrors" / f"{key}.git"


@contextmanager
def mirror_lock(mirror: Path) -> Iterator[None]:
    """Exclusive use of a mirror (fetch, worktree add and remove) across processes."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with mirror.with_suffix(".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_mirror(repository: GitRepository, mirror: Path) -> None:
    """Clone the mirror the first time, else fetch every ref incrementally (caller holds the lock).

    Raises:
        ToolError: the repository cannot be reached or read.
    """
    env = git_env(repository)
    if not (mirror / "HEAD").exists():
        staging = mirror.with_name(mirror.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        clone = ("clone", "--mirror", "--quiet", repository.url, str(staging))
        run = _git(None, *clone, env=env, timeout=FETCH_TIMEOUT_S)
        _must(run, f"git clone --mirror of {repository.label}")
        staging.rename(mirror)
        return
    run = _git(mirror, "remote", "update", "--prune", env=env, timeout=FETCH_TIMEOUT_S)
    _must(run, f"git fetch of {repository.label}")


def resolve_commit(
    repository: GitRepository, mirror: Path, head: str, ref: str | None
) -> tuple[str, str]:
    """The exact commit `head` names in the mirror, and the ref to record it by.

    `head` "HEAD" (or empty) is the tip of the protected branch now. A full SHA that
    the fetch did not bring (a pull request's head on some hosts) is fetched by itself.

    Raises:
        SourceError: `head` is not a commit of the repository.
    """
    if head in ("", "HEAD"):
        wanted, recorded = repository.protected_ref, repository.protected_ref
    else:
        wanted, recorded = head, ref or head
    found = _git(mirror, "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}")
    if not found.ok and _SHA.match(wanted):
        _git(mirror, "fetch", "--quiet", "origin", wanted, env=git_env(repository))
        found = _git(mirror, "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}")
    if not found.ok:
        msg = f"{head!r} is not a commit of {repository.label}"
        raise SourceError(msg)
    return found.output.strip(), recorded


def commit_on_branch(repo: str | Path, commit: str, branch: str) -> bool:
    """True when `commit` is reachable from `branch`'s tip in `repo` (a mirror or a checkout)."""
    where = Path(repo)
    tip = _git(where, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}")
    if not tip.ok:
        return False
    return _git(where, "merge-base", "--is-ancestor", commit, tip.output.strip()).ok


def _not_on_branch(repository: GitRepository, mirror: Path, commit: str) -> str | None:
    """Why `commit` is not on the protected branch in `mirror` (None: it is on it)."""
    where = f"{repository.protected_branch} of {repository.label}"
    if not _SHA.match(commit):
        return f"{commit!r} is not a full commit SHA, so it cannot be checked against {where}"
    if commit_on_branch(mirror, commit, repository.protected_branch):
        return None
    if not _git(mirror, "cat-file", "-e", f"{commit}^{{commit}}").ok:
        return f"commit {commit} is not on {where} (no such commit there)"
    return f"commit {commit} is not on {where}"


def unreviewed_commits(repository: GitRepository, commits: Iterable[str]) -> dict[str, str]:
    """Each of `commits` the protected branch does not reach, with why, after one fresh fetch.

    The pinned repository's mirror decides, fetched now under its lock: not a checkout's
    own branches, not a ref a ledger record names. One fetch for any number of commits.

    Raises:
        ToolError: the repository cannot be reached.
    """
    mirror = mirror_path(repository)
    with mirror_lock(mirror):
        update_mirror(repository, mirror)
        found = {commit: _not_on_branch(repository, mirror, commit) for commit in commits}
    return {commit: why for commit, why in found.items() if why is not None}


def verify_reviewed(repository: GitRepository, commit: str) -> None:
    """`commit` is on the protected branch of `repository`, as a fresh fetch sees it now.

    Raises:
        UnreviewedCommit: it is not (the message names the full SHA, branch, repository).
        ToolError: the repository cannot be reached.
    """
    why = unreviewed_commits(repository, [commit]).get(commit)
    if why is not None:
        msg = f"{why}: it may not ship"
        raise UnreviewedCommit(msg)


@task(cache_policy=NO_CACHE, **STAGE_RETRY_OPTIONS)
def prepare_workspace(repository: GitRepository, head: str, ref: str | None = None) -> Workspace:
    """Fetch the repository and check out exactly `head` into a worktree of this run's own.

    Raises:
        SourceError: `head` is not a commit of the repository.
        ToolError: the repository cannot be reached (retried).
    """
    mirror = mirror_path(repository)
    path = state_dir() / "git" / "workspaces" / uuid.uuid4().hex[:16]
    with mirror_lock(mirror):
        update_mirror(repository, mirror)
        commit, recorded = resolve_commit(repository, mirror, head, ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        _must(
            _git(mirror, "worktree", "add", "--detach", "--quiet", str(path), commit),
            f"git worktree add of {commit[:12]}",
        )
        protected = commit_on_branch(mirror, commit, repository.protected_branch)
    workspace = Workspace(
        path=str(path),
        mirror=str(mirror),
        repository=repository.label,
        commit=commit,
        ref=recorded,
        protected=protected,
        protected_branch=repository.protected_branch,
    )
    run_logger().info(
        "checked out %s at %s (%s) into %s; %s",
        workspace.repository,
        commit[:12],
        recorded,
        path,
        f"on {repository.protected_branch}: may ship"
        if protected
        else f"not on {repository.protected_branch}: checks and images only",
    )
    return workspace


@task(cache_policy=NO_CACHE)
def use_checkout(repository: GitRepository, repo: str, ref: str | None = None) -> Workspace:
    """A local checkout checked in place (development): its HEAD, as if it were a workspace.

    Whether it may ship is the pinned repository's to say, after a fresh fetch: the
    checkout's own `main` is whatever its owner committed, so a commit only the checkout
    has is checked and its images built, nothing more. A repository that cannot be
    reached says nothing either way: checks and images only, with the reason logged.

    Raises:
        SourceError: `repo` is not a git checkout with a commit.
    """
    found = _git(Path(repo), "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if not found.ok:
        msg = f"'HEAD' is not a commit in {repo}"
        raise SourceError(msg)
    commit = found.output.strip()
    try:
        why = unreviewed_commits(repository, [commit]).get(commit)
    except ToolError as exc:
        why = f"{repository.label} cannot be fetched ({exc})"
    if why is not None:
        run_logger().info("%s: checks and images only", why)
    return Workspace(
        path=repo,
        mirror=repo,
        repository=repository.label,
        commit=commit,
        ref=ref or "HEAD",
        protected=why is None,
        protected_branch=repository.protected_branch,
    )


@task(cache_policy=NO_CACHE)
def remove_workspace(workspace: Workspace) -> None:
    """Remove the run's worktree (its virtual environments with it) and its scratch files."""
    mirror, path = Path(workspace.mirror), Path(workspace.path)
    with mirror_lock(mirror):
        _git(mirror, "worktree", "remove", "--force", str(path))
        shutil.rmtree(path, ignore_errors=True)
        _git(mirror, "worktree", "prune")
    shutil.rmtree(scratch_root(path), ignore_errors=True)
    run_logger().info("removed the workspace of %s", workspace.commit[:12])


def read_protected_file(repository: GitRepository, path: str, *, fetch: bool = True) -> str:
    """`path` as committed on the tip of the protected branch, freshly fetched.

    Not the working tree, not a file a caller names: what the protected branch holds,
    which takes a reviewed commit to change. `fetch=False` reads the mirror as the last
    fetch left it (a second file of the same decision, read at the same commit).

    Raises:
        ConfigError: the protected branch has no such file.
        ToolError: the repository cannot be reached.
    """
    mirror = mirror_path(repository)
    with mirror_lock(mirror):
        if fetch or not mirror.exists():
            update_mirror(repository, mirror)
        shown = _git(mirror, "show", f"{repository.protected_ref}:{path}")
    if not shown.ok:
        msg = f"{path} is not on {repository.protected_branch} of {repository.label}"
        raise ConfigError(msg)
    return shown.output

"""A checkout of the monorepo for CI tests: copy services and libs into a temporary git repo."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from blocks.config import load_config
from tasks.python_build import lock_service, sync_service
from tests.trust import pin_repository

REPO = Path(__file__).resolve().parents[2]
CONFIG = load_config(str(REPO / "config" / "pipeline.yaml"))
SAMPLE = "auth"
"""The service the task tests check (servicekit only: the smallest closure)."""

_IGNORED = shutil.ignore_patterns(
    ".venv",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".coverage*",
    "*.egg-info",
)
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "ci-test",
    "GIT_AUTHOR_EMAIL": "ci-test@example.invalid",
    "GIT_COMMITTER_NAME": "ci-test",
    "GIT_COMMITTER_EMAIL": "ci-test@example.invalid",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
}


def git(repo: Path, *args: str) -> str:
    """Run git in `repo`; the output."""
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=_GIT_ENV, check=True
    )
    return done.stdout


def commit_all(repo: Path, message: str) -> str:
    """Commit everything in `repo`; the new commit."""
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def push_commit(clone: Path, name: str, text: str, branch: str = "main") -> str:
    """Write `name` in `clone`, commit it and push the commit to `branch`; the commit."""
    (clone / name).write_text(text)
    sha = commit_all(clone, f"add {name}")
    git(clone, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
    return sha


def bare_remote(root: Path) -> tuple[Path, Path]:
    """A bare remote under `root` and a clone to push from; main has one commit."""
    bare = root / "remote.git"
    git(root, "init", "-q", "--bare", "-b", "main", str(bare))
    clone = root / "clone"
    git(root, "clone", "-q", str(bare), str(clone))
    git(clone, "checkout", "-q", "-b", "main")
    push_commit(clone, "a.txt", "one\n")
    return bare, clone


@contextmanager
def pinned(checkout: Path, **more: Any) -> Iterator[Path]:
    """`checkout`'s main pushed to a bare remote beside it, pinned as this process's
    repository (a trust file, `config: null`; `more`: its other fields) for the duration:
    a commit of the checkout ships only so."""
    bare = checkout.with_name(checkout.name + "-remote.git")
    git(checkout.parent, "init", "-q", "--bare", "-b", "main", str(bare))
    git(checkout, "push", "-q", str(bare), "main")
    with pytest.MonkeyPatch.context() as mp:
        pin_repository(mp, checkout.parent, bare, **more)
        yield bare


def copy_monorepo(dest: Path, services: list[str], *, pipeline: bool = False) -> Path:
    """A git repository at `dest` holding `services` (+ shared files), every lib, the config;
    with `pipeline`, also prefect.yaml and the flows (what a worker pinning it compares
    a deployment with)."""
    (dest / "services").mkdir(parents=True, exist_ok=True)
    for shared in (REPO / "services").iterdir():
        if shared.is_file():
            shutil.copy(shared, dest / "services" / shared.name)
    for name in services:
        shutil.copytree(REPO / "services" / name, dest / "services" / name, ignore=_IGNORED)
    shutil.copytree(REPO / "libs", dest / "libs", ignore=_IGNORED)
    shutil.copytree(REPO / "config", dest / "config", ignore=_IGNORED)
    for ignore in (".gitignore", ".dockerignore"):
        shutil.copy(REPO / ignore, dest / ignore)
    if pipeline:
        shutil.copy(REPO / "prefect.yaml", dest / "prefect.yaml")
        shutil.copytree(REPO / "flows", dest / "flows", ignore=_IGNORED)
    git(dest, "init", "-q", "-b", "main")
    commit_all(dest, "initial")
    return dest


def snapshot_checkout(dest: Path) -> Path:
    """This checkout as it is now (uncommitted changes and new files included), committed
    as `main` of a git repository at `dest`: a worker pinning that repository's `main` reads
    the tree under test, not the branch `main` of this one."""
    listed = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() or source.is_symlink():  # a deleted file is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)
    git(dest, "init", "-q", "-b", "main")
    commit_all(dest, "the tree under test")
    return dest


@cache
def synced_checkout() -> Path:
    """One checkout per session with SAMPLE locked and synced; tests restore what they change."""
    repo = copy_monorepo(Path(tempfile.mkdtemp(prefix="ci-checkout-")), [SAMPLE])
    spec = CONFIG.service(SAMPLE)
    lock_service.fn(spec, str(repo))
    sync_service.fn(spec, str(repo))
    return repo

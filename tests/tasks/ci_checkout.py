"""A checkout of the monorepo for CI tests: copy services and libs into a temporary git repo."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from blocks.config import load_config
from tasks.python_build import lock_service, sync_service

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


def copy_monorepo(dest: Path, services: list[str]) -> Path:
    """A git repository at `dest` holding `services` (+ shared files), every lib, the config."""
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

"""Change detection through the lib closure, fingerprints, stage retry and cache keys."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from prefect.states import Completed, Failed

from blocks.catalog import ServiceCatalog
from core.errors import CheckFailed, SourceError, StageFailed, ToolError
from tasks.process import retry_on_tool_error
from tasks.quality import SHARED_CONFIGS
from tasks.source import (
    affected_services,
    changed_paths,
    current_commit,
    detect_changes,
    fingerprint,
    is_shared_build_file,
    lib_dependencies,
    read_tool_versions,
    shared_build_files,
)
from tests.tasks.ci_checkout import CONFIG, REPO, commit_all, git

CATALOG: ServiceCatalog = CONFIG.catalog
AUTHN_USERS = ["api-gateway", "user", "enrollment", "assessment", "payment"]
VERSIONS = {"uv": "0.13.9", "python": "3.11.7"}


def write(repo: Path, path: str, text: str) -> None:
    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small monorepo: two services, both libs, shared build files, docs."""
    root = tmp_path / "mono"
    for path in (
        "services/auth/pyproject.toml",
        "services/auth/src/auth/main.py",
        "services/user/pyproject.toml",
        "services/user/src/user/main.py",
        "libs/servicekit/src/servicekit/app.py",
        "libs/authn/src/authn/tokens.py",
        "services/Dockerfile",
        "services/README.md",
        "README.md",
    ):
        write(root, path, f"# {path}\n")
    write(root, ".gitignore", ".venv/\n__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    commit_all(root, "initial")
    return root


def change(repo: Path, path: str) -> list[str]:
    """Commit a change to `path`; the services change detection finds for that commit."""
    write(repo, path, f"# changed {path}\n")
    commit_all(repo, f"change {path}")
    return affected_services(changed_paths(repo, "HEAD~1", "HEAD"), CATALOG)


def test_service_change_affects_only_that_service(repo: Path) -> None:
    assert change(repo, "services/auth/src/auth/main.py") == ["auth"]
    assert changed_paths(repo, "HEAD~1", "HEAD") == ["services/auth/src/auth/main.py"]


def test_lib_change_affects_its_dependents_through_the_closure(repo: Path) -> None:
    assert change(repo, "libs/authn/src/authn/tokens.py") == AUTHN_USERS
    # servicekit: every service, directly or through authn
    assert change(repo, "libs/servicekit/src/servicekit/app.py") == CATALOG.names()


def test_shared_build_files_affect_all_and_docs_none(repo: Path) -> None:
    assert change(repo, "services/Dockerfile") == CATALOG.names()
    assert change(repo, "services/ruff.toml") == CATALOG.names()
    assert change(repo, "services/README.md") == []
    assert change(repo, "README.md") == []
    assert change(repo, "docs/guide.md") == []


def test_affected_services_is_pure_and_ordered() -> None:
    paths = ["services/payment/x.py", "services/auth/y.py", "services/unknown/z.py"]
    assert affected_services(paths, CATALOG) == ["auth", "payment"]
    assert affected_services([], CATALOG) == []
    assert affected_services(["services/authx/a.py"], CATALOG) == []


def test_bad_refs_are_named(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="'no-such-branch' is not a commit"):
        changed_paths(repo, "no-such-branch", "HEAD")
    with pytest.raises(SourceError, match=r"'HEAD~1' is not a commit"):
        changed_paths(repo, "HEAD~1", "HEAD")  # one commit only: no parent
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SourceError, match="'HEAD' is not a commit"):
        current_commit.fn(str(plain))


def test_detect_changes_and_current_commit_tasks(repo: Path) -> None:
    write(repo, "libs/authn/src/authn/tokens.py", "# v2\n")
    head = commit_all(repo, "authn v2")
    assert current_commit.fn(str(repo)) == head
    assert detect_changes.fn(str(repo), "HEAD~1", "HEAD", CATALOG) == AUTHN_USERS


def test_fingerprint_is_stable_and_location_independent(repo: Path, tmp_path: Path) -> None:
    auth = CATALOG.get("auth")
    first = fingerprint(repo, auth, CATALOG, VERSIONS)
    assert first == fingerprint(repo, auth, CATALOG, VERSIONS)
    assert len(first) == 64
    # caches, environments and coverage data do not count
    write(repo, "services/auth/.venv/bin/python", "binary")
    write(repo, "services/auth/src/auth/__pycache__/main.cpython-311.pyc", "bytecode")
    write(repo, "services/auth/.mypy_cache/3.11/cache.db", "cache")
    write(repo, "services/auth/.coverage", "data")
    assert fingerprint(repo, auth, CATALOG, VERSIONS) == first
    # another checkout of the same content
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    assert fingerprint(copy, auth, CATALOG, VERSIONS) == first
    # a directory that is not a git repository is walked instead
    shutil.rmtree(copy / ".git")
    assert fingerprint(copy, auth, CATALOG, VERSIONS) == first


def test_fingerprint_follows_what_the_service_is_built_from(repo: Path) -> None:
    auth, user = CATALOG.get("auth"), CATALOG.get("user")
    before = {s.name: fingerprint(repo, s, CATALOG, VERSIONS) for s in (auth, user)}
    assert before["auth"] != before["user"]
    write(repo, "libs/authn/src/authn/tokens.py", "# changed, uncommitted\n")
    assert fingerprint(repo, auth, CATALOG, VERSIONS) == before["auth"]  # auth has no authn
    assert fingerprint(repo, user, CATALOG, VERSIONS) != before["user"]
    write(repo, "services/Dockerfile", "FROM changed\n")
    assert fingerprint(repo, auth, CATALOG, VERSIONS) != before["auth"]
    changed_tools = {**VERSIONS, "uv": "9.9.9"}
    assert fingerprint(repo, user, CATALOG, changed_tools) != fingerprint(
        repo, user, CATALOG, VERSIONS
    )
    write(repo, "services/auth/src/auth/new.py", "# untracked files count too\n")
    assert fingerprint(repo, auth, CATALOG, VERSIONS) != before["auth"]


def test_lib_dependencies_are_transitive() -> None:
    assert lib_dependencies(CATALOG, CATALOG.get("auth")) == ["servicekit"]
    assert lib_dependencies(CATALOG, CATALOG.get("payment")) == ["authn", "servicekit"]


def test_tool_versions_are_read_from_the_tools() -> None:
    versions = read_tool_versions()
    assert versions["uv"][0].isdigit()
    assert versions["python"].startswith("3.11.")


def test_only_tool_errors_are_retried() -> None:
    assert retry_on_tool_error(current_commit, None, Failed(data=ToolError("uv: timeout")))  # type: ignore[arg-type]
    lint = CheckFailed("auth", "ruff", "1 lint findings (F401)")
    assert not retry_on_tool_error(current_commit, None, Failed(data=lint))  # type: ignore[arg-type]
    assert not retry_on_tool_error(current_commit, None, Completed(data=1))  # type: ignore[arg-type]


def test_check_failed_survives_pickling() -> None:
    error = CheckFailed("auth", "pytest", "coverage 80%", "tail", 1.5, {"coverage": 80.0})
    loaded = pickle.loads(pickle.dumps(error))
    assert isinstance(loaded, StageFailed)
    assert (loaded.service, loaded.stage, loaded.summary, loaded.excerpt) == (
        "auth",
        "pytest",
        "coverage 80%",
        "tail",
    )
    assert loaded.seconds == 1.5
    assert loaded.details == {"coverage": 80.0}
    assert str(loaded) == "auth: pytest failed: coverage 80%"


def test_githubs_zero_base_of_a_first_push_affects_every_service() -> None:
    assert detect_changes.fn(str(REPO), "0" * 40, "HEAD", CONFIG.catalog) == CONFIG.catalog.names()


def test_the_services_shared_tool_configs_are_shared_build_inputs(repo: Path) -> None:
    """A change to a configuration every service's checks read reruns every service."""
    names = ["services/ruff.toml", *(f"services/{f}" for f in SHARED_CONFIGS.values())]
    assert all(is_shared_build_file(name) for name in names)
    assert set(names) <= set(shared_build_files(REPO))
    assert change(repo, "services/pytest.ini") == CATALOG.names()
    auth = CATALOG.get("auth")
    before = fingerprint(repo, auth, CATALOG, VERSIONS)
    write(repo, "services/mypy.ini", "[mypy]\nstrict = False\n")
    assert fingerprint(repo, auth, CATALOG, VERSIONS) != before

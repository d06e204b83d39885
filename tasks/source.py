"""The source tree: git refs, change detection, content fingerprints, stage caching.

Change detection maps changed paths to services: `services/<x>/...` affects `x`;
`libs/<lib>/...` affects every service depending on `lib` through the lib closure;
shared build inputs (files directly under `services/` such as the Dockerfile and
ruff.toml, except docs) affect every service; anything else affects none.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.results import ResultStore, get_result_store
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE
from prefect.utilities.callables import get_call_parameters

from blocks.catalog import ServiceSpec
from blocks.config import state_dir
from core.catalog import Catalog
from core.errors import SourceError, ToolError
from tasks.process import STAGE_RETRY_OPTIONS, run_logger, run_tool, which

SERVICES_DIR = "services"
SHARED_BUILD_FILES = (".dockerignore",)
"""Shared build inputs besides the files directly under services/ (Dockerfile, ruff.toml...)."""

EXCLUDED_PARTS = frozenset(
    {
        ".venv",
        "__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        "htmlcov",
        ".git",
        "dist",
        "build",
    }
)
EXCLUDED_NAMES = frozenset({"coverage.xml", "coverage.json", ".DS_Store"})
GIT_TIMEOUT_S = 60


# Stage plumbing shared by the stage tasks (python_build, quality, testing).


Details = dict[str, str | int | float | bool | None]


@cache
def _module_source(module: str) -> str:
    return inspect.getsource(sys.modules[module])


def stage_key(stage: Task[..., Any], parameters: Mapping[str, Any]) -> str | None:
    """The cache key of `stage` called with `parameters` (see `stage_cache_key`)."""
    fingerprint = parameters.get("fingerprint")
    if not fingerprint:
        return None
    extra = {k: str(v) for k, v in sorted(parameters.items()) if k not in {"repo", "fingerprint"}}
    digest = hashlib.sha256()
    for part in (stage.name, fingerprint, _module_source(stage.fn.__module__), repr(extra)):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"ci-{stage.name}-{digest.hexdigest()[:32]}"


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Cache a stage by (its task, the service fingerprint, its module's source, other inputs).

    The checkout path is left out, so another checkout of the same content hits the
    cache. Without a fingerprint nothing is cached.
    """
    return stage_key(context.task, parameters)


@dataclass(frozen=True)
class StageCall:
    """A cached stage as the flow submits it, before its fingerprint is known.

    The flow submits the stage from it, and the sync stage asks it whether the stage will
    run at all (`cached`): a service whose every check is cached needs no environment.
    """

    stage: str
    task: Task[..., Any]
    parameters: dict[str, Any]

    @classmethod
    def of(cls, stage: str, task: Task[..., Any], *args: Any, **kwargs: Any) -> StageCall:
        """The call `task(*args, **kwargs)`, bound as Prefect binds it (defaults filled in)."""
        return cls(stage, task, get_call_parameters(task.fn, args, kwargs))

    def submit(self, fingerprint: Any, wait_for: list[PrefectFuture[Any]]) -> PrefectFuture[Any]:
        """Submit the call with its `fingerprint` (a value or the future of one)."""
        parameters = {**self.parameters, "fingerprint": fingerprint}
        return self.task.submit(**parameters, wait_for=wait_for, return_state=False)

    def cached(self, fingerprint: str) -> bool:
        """True when this call at `fingerprint` takes its result from the cache: exactly the
        record Prefect's engine would look up (the key, the task's result store), and never
        when the cache is off or refreshed."""
        refresh = self.task.refresh_cache
        if refresh is None:
            refresh = PREFECT_TASKS_REFRESH_CACHE.value()
        policy = self.task.cache_policy
        ours = isinstance(policy, CacheKeyFnPolicy) and policy.cache_key_fn is stage_cache_key
        if refresh or not ours:
            return False
        key = stage_key(self.task, {**self.parameters, "fingerprint": fingerprint})
        if key is None:
            return False
        # the engine's own call (async_dispatch: `_sync` makes it synchronous in any context)
        update = cast("Callable[..., ResultStore]", get_result_store().update_for_task)
        return update(self.task, _sync=True).exists(key)


def service_dir(repo: str | Path, service: ServiceSpec) -> Path:
    """The service's directory in the checkout `repo`.

    Raises:
        SourceError: the directory or its pyproject.toml does not exist.
    """
    path = Path(repo) / service.path
    if not (path / "pyproject.toml").is_file():
        msg = f"{service.name}: no pyproject.toml in {path}"
        raise SourceError(msg)
    return path


def scratch_root(repo: str | Path) -> Path:
    """The per-checkout directory under the state dir that holds its scratch files."""
    key = hashlib.sha256(str(Path(repo).resolve()).encode()).hexdigest()[:12]
    return state_dir() / "ci" / key


def scratch_dir(repo: str | Path, service: str, kind: str) -> Path:
    """A per-checkout, per-service directory under the state dir (caches, reports)."""
    path = scratch_root(repo) / service / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


# Git and change detection.


def _git(repo: str | Path, *args: str) -> str:
    done = run_tool([which("git"), "-C", str(repo), *args], timeout=GIT_TIMEOUT_S)
    if not done.ok:
        msg = f"git {' '.join(args)} failed in {repo}: {done.excerpt(5)}"
        raise SourceError(msg)
    return done.output


def verify_ref(repo: str | Path, ref: str) -> str:
    """The commit `ref` names in `repo`.

    Raises:
        SourceError: `repo` is not a git repository, or `ref` is not a commit in it.
    """
    done = run_tool(
        [which("git"), "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        timeout=GIT_TIMEOUT_S,
    )
    if not done.ok:
        msg = f"{ref!r} is not a commit in {repo}"
        raise SourceError(msg)
    return done.output.strip()


def changed_paths(repo: str | Path, base: str, head: str) -> list[str]:
    """Paths changed between `base` and `head` (git diff --name-only base..head).

    Raises:
        SourceError: `repo` is not a git repository, or a ref is not a commit (named).
    """
    for ref in (base, head):
        verify_ref(repo, ref)
    output = _git(repo, "diff", "--name-only", "--no-renames", f"{base}..{head}")
    return [line for line in output.splitlines() if line]


def is_shared_build_file(path: str) -> bool:
    """True for a file every service's build or checks read (see the module docstring)."""
    parts = path.strip("/").split("/")
    if path.strip("/") in SHARED_BUILD_FILES:
        return True
    return len(parts) == 2 and parts[0] == SERVICES_DIR and not parts[1].endswith(".md")


def shared_build_files(repo: Path) -> list[str]:
    """The shared build inputs present in the checkout `repo`, sorted."""
    candidates = [f for f in SHARED_BUILD_FILES if (repo / f).is_file()]
    if (repo / SERVICES_DIR).is_dir():
        candidates += [f"{SERVICES_DIR}/{p.name}" for p in (repo / SERVICES_DIR).iterdir()]
    return sorted(f for f in candidates if (repo / f).is_file() and is_shared_build_file(f))


def affected_services(paths: Iterable[str], catalog: Catalog) -> list[str]:
    """Services affected by changes to `paths`, in catalog order."""
    by_path = {s.path.strip("/"): s.name for s in catalog.services}
    lib_by_path = {lib.path.strip("/"): lib.name for lib in catalog.libs}
    hit: set[str] = set()
    for raw in paths:
        path = raw.strip("/")
        if is_shared_build_file(path):
            return catalog.names()
        for prefix, name in by_path.items():
            if path.startswith(prefix + "/"):
                hit.add(name)
        for prefix, lib in lib_by_path.items():
            if path.startswith(prefix + "/"):
                hit.update(catalog.dependents_of_lib(lib))
    return [name for name in catalog.names() if name in hit]


def lib_dependencies(catalog: Catalog, service: ServiceSpec) -> list[str]:
    """Every lib `service` uses, directly or through other libs, sorted."""
    libs = {lib.name: lib for lib in catalog.libs}
    found: set[str] = set()
    todo = list(service.libs)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(libs[name].libs)
    return sorted(found)


def excluded_from_source(relative: Path) -> bool:
    """Whether a path (relative to the repository) is a cache, an environment or coverage
    output: never part of a service's source, its fingerprint or its image build context."""
    parts = relative.parts
    return (
        any(p in EXCLUDED_PARTS or p.endswith(".egg-info") for p in parts)
        or relative.name in EXCLUDED_NAMES
        or relative.name.startswith(".coverage")
        or relative.suffix == ".pyc"
    )


def _listed_files(repo: Path, directory: str) -> list[str]:
    """Files under `directory`: git's view (tracked + untracked, not ignored) or a walk."""
    if (repo / ".git").exists():
        output = _git(
            repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", directory
        )
        names = {n for n in output.split("\0") if n}
    else:
        names = {str(p.relative_to(repo)) for p in (repo / directory).rglob("*") if p.is_file()}
    return sorted(n for n in names if not excluded_from_source(Path(n)) and (repo / n).is_file())


def fingerprint(
    repo: str | Path,
    service: ServiceSpec,
    catalog: Catalog,
    tool_versions: Mapping[str, str],
) -> str:
    """sha256 over the service's files, its libs' files, shared build files and tool versions.

    Caches, virtual environments and coverage output are left out; so is the checkout's
    location, so two checkouts of the same content have the same fingerprint.
    """
    root = Path(repo)
    lib_paths = {lib.name: lib.path for lib in catalog.libs}
    directories = [service.path] + [lib_paths[n] for n in lib_dependencies(catalog, service)]
    files: list[str] = []
    for directory in directories:
        files.extend(_listed_files(root, directory))
    files.extend(shared_build_files(root))
    digest = hashlib.sha256(f"service={service.name}\0".encode())
    for name, version in sorted(tool_versions.items()):
        digest.update(f"tool={name}={version}\0".encode())
    for name in files:
        digest.update(f"file={name}\0".encode())
        digest.update(hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()


def read_tool_versions() -> dict[str, str]:
    """The versions that shape every stage's result: uv and the Python that runs it."""
    done = run_tool([which("uv"), "--version"], timeout=GIT_TIMEOUT_S)
    if not done.ok:
        msg = f"uv --version failed: {done.excerpt(5)}"
        raise ToolError(msg)
    words = done.output.split()
    python = ".".join(str(p) for p in sys.version_info[:3])
    return {"uv": words[1] if len(words) > 1 else done.output.strip(), "python": python}


# Tasks.


@task
def current_commit(repo: str) -> str:
    """The commit HEAD points to in `repo`.

    Raises:
        SourceError: `repo` is not a git repository or has no commit.
    """
    return verify_ref(repo, "HEAD")


def is_empty_base(base: str) -> bool:
    """True for GitHub's all-zero `before` of a branch's first push: every service counts."""
    return bool(base) and set(base) == {"0"}


def check_refs(repo: str | Path, base: str, head: str) -> None:
    """Both refs of a change detection name commits in `repo` (an empty base counts).

    Raises:
        SourceError: naming the ref that is not a commit.
    """
    for ref in (head,) if is_empty_base(base) else (base, head):
        verify_ref(repo, ref)


@task
def detect_changes(repo: str, base: str, head: str, catalog: Catalog) -> list[str]:
    """The services affected by the changes from `base` to `head`, in catalog order.

    A base of all zeros (GitHub's `before` on a branch's first push) means every service.
    """
    if is_empty_base(base):
        run_logger().info("base %s is GitHub's empty commit: every service is affected", base)
        return catalog.names()
    paths = changed_paths(repo, base, head)
    affected = affected_services(paths, catalog)
    run_logger().info(
        "%d paths changed in %s..%s; affected services: %s",
        len(paths),
        base,
        head,
        ", ".join(affected) or "none",
    )
    return affected


@task(**STAGE_RETRY_OPTIONS)
def get_tool_versions() -> dict[str, str]:
    """The tool versions every fingerprint includes."""
    return read_tool_versions()


@task(task_run_name="fingerprint_service-{service.name}")
def fingerprint_service(
    repo: str, service: ServiceSpec, catalog: Catalog, tool_versions: dict[str, str]
) -> str:
    """The content fingerprint of `service` in `repo` (see `fingerprint`)."""
    value = fingerprint(repo, service, catalog, tool_versions)
    run_logger().info("%s fingerprint %s", service.name, value[:12])
    return value


def service_env(path: Path) -> dict[str, str]:
    """Variables for tools run in the service's own environment (not the pipeline's venv)."""
    return {"VIRTUAL_ENV": str(path / ".venv"), "PYTHONPATH": "", "NO_COLOR": "1"}

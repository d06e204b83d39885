"""Session-wide isolation: a temporary Prefect home and server, a temporary state dir.

The suite runs on two pytest-xdist workers (`-n 2 --dist loadscope` in pyproject's addopts).
Each worker is a session of its own: its own temporary directory, Prefect home, state dir
and Prefect test server. What the workers share is the local stack (engine, registry, base
image; `ensure_stack` takes a file lock) and uv's cache. `--dist loadscope` keeps each
module on one worker; the hooks below mark what needs the stack and order the modules.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="elice-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
# Each session (each xdist worker is one) keeps its ledger, mirrors and workspaces apart:
# under the ELICE_STATE_DIR the run was started with, one directory per worker, else in
# the session's own directory. Workers inherit the controller's environment, so the
# directory the run started with is passed on in ELICE_TESTS_STATE_BASE.
_STATE_BASE = os.environ.setdefault("ELICE_TESTS_STATE_BASE", os.environ.get("ELICE_STATE_DIR", ""))
os.environ["ELICE_STATE_DIR"] = (
    str(Path(_STATE_BASE) / os.environ.get("PYTEST_XDIST_WORKER", "main"))
    if _STATE_BASE
    else str(_SESSION_DIR / "state")
)

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks.config import PipelineConfig, load_config  # noqa: E402
from tests.plugins.lifetime import harness_server_pid, reaped  # noqa: E402

pytest_plugins = [
    "tests.plugins.stack",
    "tests.plugins.receivers",
    "tests.plugins.aws",
    "tests.plugins.postgres",
    "tests.plugins.registries",
    "tests.plugins.faults",
    "tests.plugins.kube",
]

REPO = Path(__file__).resolve().parents[1]

STACK_FIXTURE = "stack"
"""A test that uses this fixture (directly or through another) is marked `stack`."""
SLOW_FIXTURES = frozenset({"postgres_prefect", "kube", "fresh_server"})
"""A test that uses one of these (a real server that takes long to start: 25-60 s on two
busy cores) is marked `slow`: `fresh_server` is tests/reconcile/test_setup.py's own
`prefect server start`."""


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark each test as it is collected, before `-m` selects: `stack` on every test that
    uses the local stack (the `stack` fixture or one built on it, e.g. `docker_client`,
    `pushed_image`), `slow` on every test using one of `SLOW_FIXTURES` (other slow tests
    carry the mark themselves). `-m "not stack and not slow"` is the fast tier."""
    used = set(getattr(item, "fixturenames", ()))
    if STACK_FIXTURE in used and not item.get_closest_marker("stack"):
        item.add_marker(pytest.mark.stack)
    if SLOW_FIXTURES & used and not item.get_closest_marker("slow"):
        item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: hand out modules with `slow` tests first, then those with `stack`
    ones, so the longest modules do not start last and leave one worker running alone at
    the end. `--dist loadscope` keeps each module on one worker (its module fixtures are set
    up once, its tests keep their order); the modules are then handed out in this order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order makes no difference to the wall time

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        return 1 if item.get_closest_marker("stack") else 2

    first: dict[str, int] = {}
    rank: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(module(item), index)
        rank[module(item)] = min(rank.get(module(item), 2), weight(item))
    items.sort(key=lambda item: (rank[module(item)], first[module(item)]))


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One real temporary Prefect server for the whole session; it ends with the test
    process even when that is killed without its teardown."""
    with prefect_test_harness(server_startup_timeout=300):
        with reaped(harness_server_pid()):
            yield


@pytest.fixture(scope="module", autouse=True)
def module_environment() -> Iterator[None]:
    """Each module leaves the process environment as it found it: a module fixture that
    sets a variable (a trust file, ELICE_STORAGE) and is not undone, because its setup
    failed half-way, cannot change what the next module on this worker reads."""
    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before):
        del os.environ[name]
    os.environ.update(before)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """A temporary directory that lives as long as the test session."""
    return _SESSION_DIR


@pytest.fixture(scope="session")
def config() -> PipelineConfig:
    """The embedded default configuration."""
    return load_config(str(REPO / "config" / "pipeline.yaml"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's temporary directory goes with it (each xdist worker removes its own):
    a suite run leaves no Prefect home, ledger or workspace behind in the temp dir."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)

"""Session-wide isolation: a temporary Prefect home and server, a temporary state dir."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="elice-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.setdefault("ELICE_STATE_DIR", str(_SESSION_DIR / "state"))

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks.config import PipelineConfig, load_config  # noqa: E402

pytest_plugins = [
    "tests.plugins.stack",
    "tests.plugins.receivers",
    "tests.plugins.aws",
    "tests.plugins.postgres",
    "tests.plugins.registries",
    "tests.plugins.faults",
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One real temporary Prefect server for the whole session."""
    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """A temporary directory that lives as long as the test session."""
    return _SESSION_DIR


@pytest.fixture(scope="session")
def config() -> PipelineConfig:
    """The embedded default configuration."""
    return load_config(str(REPO / "config" / "pipeline.yaml"))

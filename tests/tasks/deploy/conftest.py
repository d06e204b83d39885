"""The deploy targets are driven directly (the docker engine, the Kubernetes simulator):
no Prefect server is needed, so the session one is not started for them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> None:
    """Overrides tests/conftest.py's server: tasks here run through `.fn`, outside Prefect."""
    return

"""These tests never talk to a Prefect server: skip starting the session one for them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> None:
    """Overrides tests/conftest.py's server: tasks here run through `.fn`, outside Prefect."""
    return
